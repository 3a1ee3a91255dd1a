"""Plain functions the tests share (fixtures live in conftest.py): hand-written data files, tiny real artifacts
built the way the real jobs build them, settings, Redis loading, waiting, and the brute-force reference ranking.

Every artifacts root here is private to its test (or module): models are copied from the session's trained
model, indexes are built with `training.index_build` from a model's saved item vectors and published by moving the
ACTIVE_INDEX pointer, exactly as the re-index job does.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from service.settings import Settings
from service.store import FeatureStore
from training.artifacts import INDEX_VERSION_PREFIX, ArtifactStore, LoadedModel, load_model, new_version, save_model
from training.config import TrainConfig
from training.features import encode_item_frame, encode_users
from training.index import ItemIndex, save_index
from training.index_build import build_index
from training.model import TowerConfig, embed_items, embed_users

ADMIN_TOKEN = "test-admin-token-0123456789"
# The session model (conftest.py): small enough to train in seconds, trained once (no refit: that would train it
# twice; the refit has a test of its own).
TINY_CONFIG = TrainConfig(
    epochs=30,
    batch_size=1024,
    eval_every=5,
    seed=3,
    temperature=1.0,
    refit="never",
    tower=TowerConfig(dim=16, id_dim=16, hidden=(32,), use_user_id=False, use_user_features=True, normalize=False),
)

# --------------------------------------------------------------------------- data files

ML1M_RATINGS = "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"


ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072-1234\n"


ML1M_MOVIES = (
    "10::Café Society (1995)::Drama\n"
    "20::Toy Story (1995)::Animation|Children's|Comedy\n"
    "30::Never Rated (1999)::Drama|Thriller\n"
)


LATEST_RATINGS = "userId,movieId,rating,timestamp\n1,10,3.5,1112486027\n1,20,4.0,1112484676\n2,10,5.0,1112484819\n"


LATEST_MOVIES = (
    "movieId,title,genres\n"
    '10,"American President, The (1995)",Comedy|Drama|Romance\n'
    "20,Babylon 5,(no genres listed)\n"
    '30,"Fawlty Towers (1975-1979)",Comedy\n'
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def write_ml1m(
    folder: Path, ratings: str = ML1M_RATINGS, users: str | None = ML1M_USERS, movies: str = ML1M_MOVIES
) -> Path:
    write(folder / "ratings.dat", ratings, "latin-1")
    write(folder / "movies.dat", movies, "latin-1")
    if users is not None:
        write(folder / "users.dat", users, "latin-1")
    return folder


def write_latest(folder: Path, ratings: str = LATEST_RATINGS, movies: str = LATEST_MOVIES) -> Path:
    write(folder / "ratings.csv", ratings)
    write(folder / "movies.csv", movies)
    return folder


def write_generic(folder: Path, interactions: str = "user_id,item_id,timestamp\nu1,i1,100\nu2,i2,200\n") -> Path:
    write(folder / "interactions.csv", interactions)
    return folder


def clustered_vectors(
    n: int, dim: int, clusters: int, seed: int, centroid_seed: int = 0, spread: float = 1.0
) -> np.ndarray:
    """(n, dim) float32 vectors around `clusters` unit-norm centroids (the same for a `centroid_seed`): stand-ins
    for item-tower and user-tower outputs that share a geometry."""
    centroids = np.random.default_rng(centroid_seed).standard_normal((clusters, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return np.ascontiguousarray(centroids[rng.integers(clusters, size=n)] + noise)


# --------------------------------------------------------------------------- vectors for the index tests

# Seeded clustered vectors stand in for item-tower and user-tower outputs in tests/test_index*.py. 10,000 items
# are enough training points for 8-bit PQ codebooks (256 centroids x 39).
INDEX_ITEMS_N, INDEX_DIM, INDEX_CLUSTERS, INDEX_K = 10_000, 32, 50, 10
INDEX_ITEMS = clustered_vectors(INDEX_ITEMS_N, INDEX_DIM, INDEX_CLUSTERS, seed=1)  # (N, D)
INDEX_USERS = clustered_vectors(500, INDEX_DIM, INDEX_CLUSTERS, seed=2)  # (Q, D)
INDEX_ITEM_IDS = [f"item-{i}" for i in range(INDEX_ITEMS_N)]


@functools.cache
def built_index(recipe: str, target: float = 0.9) -> tuple[ItemIndex, dict[str, Any]]:
    """An index over INDEX_ITEMS tuned on INDEX_USERS, built once per (recipe, target) for the whole session."""
    return build_index(
        INDEX_ITEMS,
        INDEX_ITEM_IDS,
        recipe,
        target,
        INDEX_USERS,
        INDEX_K,
        model_version="model-a",
        progress=False,
        measure_speed=False,
    )


def brute_force_top_k(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of INDEX_ITEMS by dot product: (scores, positions), best first."""
    scores = queries @ INDEX_ITEMS.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# --------------------------------------------------------------------------- artifacts, settings, Redis


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
    items = encode_item_frame(model.spec, model.vocabs, catalog)
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
    )
    version = new_version(INDEX_VERSION_PREFIX)
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
        spec, model.model.vocabs, [user_id], {f.name: [features.get(f.name)] for f in spec.user_features}, [history]
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


def load_users(users: pd.DataFrame, url: str, prefix: str, data_dir: Path) -> int:
    """What `twotower load-features` does: a users table (a model's `users()`) into Redis."""

    async def write() -> int:
        store = FeatureStore(url, data_dir=data_dir, prefix=prefix, max_history=200, timeout=10.0)
        await store.start()
        try:
            return await store.load_users(users)
        finally:
            await store.close()

    return asyncio.run(write())
