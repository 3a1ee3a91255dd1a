"""Shared fixtures: a tiny real model trained once per session on planted synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.artifacts import ArtifactStore, LoadedModel, load_model
from training.data import Dataset, synthetic
from training.model import TowerConfig
from training.train import TrainConfig, train_and_save

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    return synthetic(n_users=400, n_items=300, n_clusters=6, interactions_per_user=20, seed=7)


TINY_CONFIG = TrainConfig(
    epochs=30,
    batch_size=32,
    eval_every=5,
    seed=3,
    temperature=1.0,
    tower=TowerConfig(dim=16, id_dim=16, hidden=(32,), use_user_id=False, normalize=False),
)


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def trained_model(tiny_dataset: Dataset, artifacts_root: Path) -> LoadedModel:
    model_dir = train_and_save(tiny_dataset, ArtifactStore(artifacts_root), TINY_CONFIG, progress=False)
    return load_model(model_dir)
