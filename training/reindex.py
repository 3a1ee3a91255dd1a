"""The re-index job: embed the CURRENT catalog with a model's item tower, build and measure an index, publish it.

Used by `twotower reindex` and by the service's operators (the service itself only loads what this publishes).
One run:

1. loads a model artifact (default: the newest) and the catalog to index (default: the catalog the model was
   trained with; or a DataFrame, or an `items.csv|parquet` file: `item_id` plus feature columns, multi-valued
   ones as lists in Parquet or `|`-separated strings in CSV);
2. validates the catalog against the model's `FeatureSpec` and normalizes it (`CatalogError` names the problem:
   duplicate or missing ids, missing feature columns, values of the wrong shape; nothing is published);
3. returns the active index unchanged if it was built from the same model, catalog content (sha256), recipe and
   recall target: re-running on the same inputs is idempotent;
4. runs the item tower over the catalog in bounded chunks (items new since training have an out-of-vocabulary
   id and are carried by their features; items no longer in the catalog are simply not embedded);
5. builds the index (`training.index_build.build_index`) with the model's own user-tower outputs (a sample of its
   training users with their histories) as recall queries, tunes it to the recall target, and refuses to
   publish below it (`RecallTargetError`);
6. writes `indexes/<version>/` atomically: the index files, `items.parquet` (the normalized catalog with its raw
   features, which the service reads for attribute filters and its tower-parity check) and a manifest with the
   model version, recipe, params, recall@10, latency, dim, item count and the catalog's sha256;
7. moves the `ACTIVE_INDEX` pointer (atomic), then, when a Redis URL is given, sets the active-index key and
   publishes the version on the index-published channel (`training.redis_keys`), which running services follow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from training import artifacts, distributed
from training.artifacts import INDEX_ITEMS, INDEX_VERSION_PREFIX, ArtifactError, ArtifactStore, LoadedModel, load_model
from training.catalog import CatalogError, catalog_sha256, normalize_catalog, read_catalog
from training.features import encode_item_frame, encode_user_frame
from training.index import save_index
from training.index_build import build_index, choose_recipe
from training.model import TwoTower, embed_items, embed_users
from training.redis_keys import DEFAULT_PREFIX, RedisKeys

log = logging.getLogger(__name__)

RECALL_K = 10
# Recall is measured on at most this many of the model's training users (their user-tower outputs): enough for
# a recall@10 estimate within about ±0.005, and the exact reference search stays short on large catalogs.
RECALL_QUERIES = 2000
# Items per item-tower forward pass: bounds the encoded arrays and activations whatever the catalog size; only
# the (N, D) float32 output, which the index needs anyway, grows with the catalog.
EMBED_CHUNK = 65_536
REDIS_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- towers


def embed_catalog(
    model: TwoTower, catalog: pd.DataFrame, chunk: int = EMBED_CHUNK, progress: bool = True
) -> np.ndarray:
    """(N, D) float32 item-tower outputs for a normalized catalog, encoded and embedded `chunk` items at a time."""
    n = len(catalog)
    out = np.empty((n, model.config.dim), dtype=np.float32)  # (N, D)
    with tqdm(total=n, unit="item", desc="embed items", disable=not progress) as bar:
        for start in range(0, n, chunk):
            part = catalog.iloc[start : start + chunk]
            encoded = encode_item_frame(model.spec, model.vocabs, part)
            out[start : start + len(part)] = embed_items(model, encoded, chunk=chunk)
            bar.update(len(part))
    return out


def user_queries(loaded: LoadedModel, max_users: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray | None:
    """(Q, D) user-tower outputs for a seeded sample of the model's training users, each with its own features
    and history: the queries the index will really answer. None when the artifact holds no users."""
    try:
        users = loaded.users()
    except (OSError, ValueError) as e:
        log.warning("model %s: no training users to measure recall with (%s); using item vectors", loaded.version, e)
        return None
    if users.empty:
        return None
    if len(users) > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(len(users), size=max_users, replace=False))
        users = users.iloc[rows]
    encoded = encode_user_frame(loaded.model.spec, loaded.model.vocabs, users)
    return embed_users(loaded.model, encoded)


# --------------------------------------------------------------------------- publishing


def notify_redis(url: str, prefix: str, version: str) -> int:
    """SET the active-index key and PUBLISH the version on the index-published channel (`RedisKeys`); returns the
    number of subscribers that received it. Raises redis.RedisError (or OSError) when Redis cannot be reached."""
    import redis

    keys = RedisKeys(prefix)
    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        client.set(keys.active_index, version)
        return int(client.publish(keys.index_published, version))
    finally:
        client.close()


def _load_catalog(catalog: pd.DataFrame | str | Path | None, loaded: LoadedModel) -> tuple[pd.DataFrame, str]:
    if catalog is None:
        return loaded.catalog(), f"catalog of model {loaded.version}"
    if isinstance(catalog, pd.DataFrame):
        return catalog, "catalog DataFrame"
    return read_catalog(catalog), str(catalog)


def _matching_active(store: ArtifactStore, key: dict[str, Any]) -> str | None:
    """The active index version if it was built from exactly these inputs, else None."""
    active = store.active_index()
    if active is None or not store.index_dir(active).is_dir():
        return None
    try:
        manifest = store.index_manifest(active)
    except ArtifactError as e:
        log.warning("active index %s is unreadable (%s); building a new one", active, e)
        return None
    return active if all(manifest.get(name) == value for name, value in key.items()) else None


def _write_items(catalog: pd.DataFrame, path: Path, source: str) -> None:
    try:
        catalog.rename_axis("item_id").reset_index().to_parquet(path, index=False)
    except (ValueError, TypeError) as e:  # pyarrow's ArrowInvalid / ArrowTypeError: a column of mixed types
        raise CatalogError(f"{source}: cannot store the catalog as Parquet (a column of mixed types?): {e}") from e


def reindex(
    store: ArtifactStore,
    model_version: str | None = None,
    catalog: pd.DataFrame | str | Path | None = None,
    recipe: str = "auto",
    recall_target: float = 0.95,
    redis_url: str | None = None,
    redis_prefix: str = DEFAULT_PREFIX,
    progress: bool = True,
) -> str:
    """Index the current catalog with a model's item tower, publish it and make it active; returns its version.

    Defaults: the newest model under `store`, the catalog it was trained with, the recipe `choose_recipe` picks
    for the catalog size. Re-running on the same model, catalog content, recipe and recall target returns the
    active version and publishes nothing. Raises `CatalogError` (bad catalog), `ArtifactError` (no such model),
    `ValueError` (bad recipe) or `training.index.RecallTargetError` (target missed); in every case nothing is
    written and the active index stays as it was. Stage timings are recorded in the index manifest.
    """
    started = time.perf_counter()

    model_version = model_version or store.latest_model()
    model_dir = store.model_dir(model_version)
    if not model_dir.is_dir():
        raise ArtifactError(f"model {model_version} not found under {store.models}; have {store.model_versions()}")
    loaded = load_model(model_dir)
    model = loaded.model
    raw, source = _load_catalog(catalog, loaded)
    items = normalize_catalog(raw, model.spec, source)
    digest = catalog_sha256(items)
    n = len(items)
    resolved = choose_recipe(n, loaded.dim, recall_target) if recipe == "auto" else recipe.replace(" ", "")
    key = {
        "model_version": loaded.version,
        "catalog_sha256": digest,
        "recipe": resolved,
        "recall_target": recall_target,
    }
    existing = _matching_active(store, key)
    if existing is not None:
        log.info(
            "index %s is active and was built from model %s, this catalog (sha256 %s…) and recipe %s: nothing to do",
            existing,
            loaded.version,
            digest[:12],
            resolved,
        )
        return existing

    known = model.vocabs.item_ids
    new_items = sum(1 for item in items.index if item not in known)
    log.info(
        "re-indexing %d items (%d new since training: carried by their features) with model %s, recipe %s",
        n,
        new_items,
        loaded.version,
        resolved,
    )
    timings = {"load_s": time.perf_counter() - started}
    start = time.perf_counter()
    vectors = embed_across_ranks(model, items, progress=progress)  # (N, D), every rank's share gathered
    timings["embed_s"] = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 builds and publishes; the others learn how it went
        outcome = distributed.broadcast(None)
        if outcome[0] == "error":
            raise ArtifactError(f"rank 0 did not publish: {outcome[1]}")
        return str(outcome[1])
    try:
        job = _Job(loaded, items, source, digest, resolved, recipe, recall_target, new_items, timings, started)
        version = _publish(store, job, vectors, progress)
    except BaseException as e:
        distributed.broadcast(("error", f"{type(e).__name__}: {e}"))
        raise
    distributed.broadcast(("ok", version))
    if redis_url:
        try:
            receivers = notify_redis(redis_url, redis_prefix, version)
            log.info("Redis: %sactive_index = %s, published to %d listener(s)", redis_prefix, version, receivers)
        except Exception as e:  # redis.RedisError, OSError: the index is active regardless
            log.warning(
                "index %s is published and ACTIVE_INDEX points to it, but notifying Redis failed (%s: %s); "
                "services still pick it up by polling ACTIVE_INDEX",
                version,
                type(e).__name__,
                e,
            )
    return version


def embed_across_ranks(model: TwoTower, items: pd.DataFrame, progress: bool) -> np.ndarray:
    """`embed_catalog` of the whole catalog; under torchrun each rank embeds a contiguous share and the shares are
    gathered in rank order, which is catalog order."""
    world, rank = distributed.world(), distributed.rank()
    bounds = np.linspace(0, len(items), world + 1).astype(int)
    share = embed_catalog(model, items.iloc[bounds[rank] : bounds[rank + 1]], progress=progress and rank == 0)
    if world == 1:
        return share
    return distributed.gather_rows(torch.from_numpy(share)).numpy()


@dataclass(frozen=True)
class _Job:
    """What one re-index run indexes, and with what."""

    loaded: LoadedModel
    items: pd.DataFrame  # the normalized catalog
    source: str
    digest: str  # catalog_sha256
    recipe: str  # resolved
    recipe_requested: str
    recall_target: float
    new_items: int
    timings: dict[str, float]
    started: float


def _publish(store: ArtifactStore, job: _Job, vectors: np.ndarray, progress: bool) -> str:
    """Build, measure and write the index over `vectors`, then move the active pointer; returns the version."""
    loaded, items, source, timings = job.loaded, job.items, job.source, job.timings
    n, model = len(items), loaded.model
    version = artifacts.new_version(INDEX_VERSION_PREFIX)
    with artifacts.publishing(store.index_dir(version)) as tmp:
        _write_items(items, tmp / INDEX_ITEMS, source)
        start = time.perf_counter()
        queries = user_queries(loaded)
        item_index, report = build_index(
            vectors,
            items.index.tolist(),
            job.recipe,
            job.recall_target,
            queries,
            min(RECALL_K, n),
            model_version=loaded.version,
            progress=progress,
            n_eval_queries=RECALL_QUERIES,
        )
        timings["index_s"] = time.perf_counter() - start  # train + add + recall check and tuning + latency
        manifest = save_index(
            item_index,
            tmp,
            report,
            {
                "catalog_sha256": job.digest,
                "catalog_source": source,
                "items_file": INDEX_ITEMS,
                "new_items": job.new_items,
                "normalized": bool(model.config.normalize),
                "recipe_requested": job.recipe_requested,
                "timings": timings,
            },
            version=version,
        )
    store.set_active_index(version)
    log.info(
        "published index %s: %s %s, recall@%d %.4f (target %s), %d items, in %.1f s; ACTIVE_INDEX moved",
        version,
        manifest["recipe"],
        manifest["params"],
        manifest["recall_k"],
        manifest[f"recall@{manifest['recall_k']}"],
        job.recall_target,
        n,
        time.perf_counter() - job.started,
    )
    return version
