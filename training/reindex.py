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
5. builds the index (`training.index.build_index`) with the model's own user-tower outputs (a sample of its
   training users with their histories) as recall queries, tunes it to the recall target, and refuses to
   publish below it (`RecallTargetError`);
6. writes `indexes/<version>/` atomically: the index files, `items.parquet` (the normalized catalog with its raw
   features, which the service reads for attribute filters and its tower-parity check) and a manifest with the
   model version, recipe, params, recall@10, latency, dim, item count and the catalog's sha256;
7. moves the `ACTIVE_INDEX` pointer (atomic), then, when a Redis URL is given, sets `{prefix}active_index` and
   publishes the version on `{prefix}index_published`, which running services listen to.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from training import artifacts
from training.artifacts import INDEX_ITEMS, ArtifactError, ArtifactStore, LoadedModel, load_model
from training.data import DataFormatError, is_list, is_missing, multi_values, read_table
from training.features import FeatureDef, FeatureSpec, encode_items, encode_users
from training.index import build_index, choose_recipe, save_index
from training.model import TwoTower, embed_items, embed_users

__all__ = [
    "ITEMS_FILE",
    "CatalogError",
    "catalog_sha256",
    "embed_catalog",
    "normalize_catalog",
    "notify_redis",
    "read_catalog",
    "reindex",
    "user_queries",
]

log = logging.getLogger(__name__)

ITEMS_FILE = INDEX_ITEMS
INDEX_VERSION_PREFIX = "idx-"
ID_COLUMNS = ("item_id", "item")
RECALL_K = 10
# Recall is measured on at most this many of the model's training users (their user-tower outputs): enough for
# a recall@10 estimate within about ±0.005, and the exact reference search stays a few seconds at 1M items.
RECALL_QUERIES = 2000
# Items per item-tower forward pass: bounds the encoded arrays and activations (a few MB per chunk) whatever the
# catalog size; only the (N, D) float32 output, which the index needs anyway, grows with the catalog.
EMBED_CHUNK = 65_536
REDIS_TIMEOUT_S = 5.0
_SHOWN = 5  # offending ids/rows quoted in an error message


class CatalogError(ValueError):
    """The catalog to index is malformed; the message names the problem (source, column, ids or rows)."""


# --------------------------------------------------------------------------- reading and validating the catalog


def read_catalog(path: str | Path) -> pd.DataFrame:
    """An items table from a `.parquet` or `.csv` file, as read (validation is `normalize_catalog`'s job);
    read by the same reader as the training tables (`training.data.read_table`)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist")
    try:
        return read_table(path).frame.reset_index(drop=True)
    except DataFormatError as e:
        raise CatalogError(str(e)) from e


def _rows(positions: Sequence[int] | np.ndarray) -> str:
    shown = ", ".join(str(int(p) + 1) for p in positions[:_SHOWN])
    more = f" and {len(positions) - _SHOWN} more" if len(positions) > _SHOWN else ""
    return f"row{'s' if len(positions) > 1 else ''} {shown}{more}"


def _item_ids(frame: pd.DataFrame, source: str) -> tuple[pd.Index, pd.DataFrame]:
    """(str ids, the other columns) from an `item_id` (or `item`) column, else an index of that name."""
    column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if column is not None:
        raw, rest = frame[column], frame.drop(columns=[column])
    elif frame.index.name in ID_COLUMNS:
        raw, rest = frame.index.to_series(), frame
    else:
        raise CatalogError(
            f"{source}: no item id column: expected 'item_id' (or 'item'); found columns {[str(c) for c in frame]}"
        )
    values = list(raw)
    missing = [i for i, v in enumerate(values) if is_missing(v) or (isinstance(v, str) and v.strip() == "")]
    if missing:
        raise CatalogError(f"{source}: item_id is missing (empty, NaN or None) in {_rows(missing)}")
    if any(is_list(v) for v in values):
        bad = [i for i, v in enumerate(values) if is_list(v)]
        raise CatalogError(f"{source}: item_id must be a single value, found a list in {_rows(bad)}")
    # Integer ids stored as floats (a Parquet column written from floats) must read "7", not "7.0".
    ids = [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values]
    index = pd.Index(ids, dtype=object, name="item_id")
    if not index.is_unique:
        counts = index.value_counts()
        duplicated = counts[counts > 1]
        shown = ", ".join(f"{item!r} ({n}x)" for item, n in duplicated.head(_SHOWN).items())
        raise CatalogError(
            f"{source}: {len(duplicated)} duplicate item id{'s' if len(duplicated) > 1 else ''}: {shown}"
            + (" ..." if len(duplicated) > _SHOWN else "")
            + "; each item must appear once"
        )
    return index, rest.reset_index(drop=True)


def _multi_values(value: Any) -> list[str] | None:
    """A multi-valued cell's values (`training.data.multi_values`); None when the cell is not list-like."""
    if is_list(value):
        return multi_values(value) if np.ndim(value) == 1 else None
    return multi_values(value) if isinstance(value, str) or is_missing(value) else None


def _normalize_feature(feature: FeatureDef, column: pd.Series, source: str) -> list[Any] | pd.Series:
    """One feature column in a canonical form that gives the same tokens as the raw values and survives a
    Parquet round trip unchanged (the service re-encodes `items.parquet` and must get the same vectors)."""
    values = list(column)
    name = feature.name
    if feature.kind == "multi":
        lists = [_multi_values(v) for v in values]
        bad = [i for i, v in enumerate(lists) if v is None]
        if bad:
            raise CatalogError(
                f"{source}: column {name!r} is multi-valued: expected a list (Parquet) or a '|'-separated string "
                f"(CSV), found {type(values[bad[0]]).__name__} {values[bad[0]]!r} in {_rows(bad)}"
            )
        return lists
    bad = [i for i, v in enumerate(values) if is_list(v)]
    if bad:
        raise CatalogError(
            f"{source}: column {name!r} takes one value per item, found a list {values[bad[0]]!r} in {_rows(bad)}"
        )
    if feature.kind == "bucket":
        numbers = pd.to_numeric(column, errors="coerce")
        missing_before = np.array([is_missing(v) or (isinstance(v, str) and v.strip() == "") for v in values])
        bad_numbers = np.flatnonzero(numbers.isna().to_numpy() & ~missing_before)
        if len(bad_numbers):
            raise CatalogError(
                f"{source}: column {name!r} is numeric: found {values[bad_numbers[0]]!r} in {_rows(bad_numbers)}"
            )
        return numbers.astype(np.float64)
    # Categorical and prefix features: the very text `FeatureDef.tokens` derives from the raw value.
    return [None if is_missing(v) else str(v).strip() or None for v in values]


def normalize_catalog(frame: pd.DataFrame, spec: FeatureSpec, source: str = "catalog") -> pd.DataFrame:
    """Validate a catalog against the model's item features and return it normalized: a str `item_id` index,
    multi-valued features as lists of str, numeric (bucket) features as float, other features as str or None.
    Columns the model does not use are kept as they are (the service filters on them).

    Raises `CatalogError` naming the source and the problem: no or missing/NaN/duplicate ids, a feature column
    the model needs is absent, a multi-valued cell that is not a list, a list where one value is expected, a
    non-numeric value in a numeric feature, an empty catalog."""
    if len(frame) == 0:
        raise CatalogError(f"{source}: the catalog is empty; an index needs at least one item")
    index, rest = _item_ids(frame, source)
    missing = [f.name for f in spec.item_features if f.name not in rest.columns]
    if missing:
        raise CatalogError(
            f"{source}: missing feature column{'s' if len(missing) > 1 else ''} {missing} that the model's item "
            f"tower needs; found columns {[str(c) for c in rest.columns]}"
        )
    columns: dict[str, Any] = {str(c): rest[c] for c in rest.columns}  # rest has a RangeIndex: no realignment
    for feature in spec.item_features:
        columns[feature.name] = _normalize_feature(feature, rest[feature.name], source)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(index))).set_axis(index, axis=0)


def _canonical(value: Any) -> str:
    if is_list(value):
        return "[" + "\x1f".join(map(str, value)) + "]"
    if is_missing(value):
        return "\x00"
    return str(value)


def catalog_sha256(catalog: pd.DataFrame) -> str:
    """Content hash of a normalized catalog: ids in order, then every column by name, value by value.

    The same items in the same order hash the same whether they came from CSV, Parquet or a DataFrame."""
    digest = hashlib.sha256()
    digest.update("\x1e".join(map(str, catalog.index)).encode())
    for name in sorted(map(str, catalog.columns)):
        digest.update(f"\x1d{name}\x1d".encode())
        digest.update("\x1e".join(map(_canonical, catalog[name])).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- towers


def embed_catalog(
    model: TwoTower, catalog: pd.DataFrame, chunk: int = EMBED_CHUNK, progress: bool = True
) -> np.ndarray:
    """(N, D) float32 item-tower outputs for a normalized catalog, encoded and embedded `chunk` items at a time."""
    spec = model.spec
    n = len(catalog)
    out = np.empty((n, model.config.dim), dtype=np.float32)  # (N, D)
    with tqdm(total=n, unit="item", desc="embed items", disable=not progress) as bar:
        for start in range(0, n, chunk):
            part = catalog.iloc[start : start + chunk]
            encoded = encode_items(
                spec, model.vocabs, part.index.tolist(), {f.name: part[f.name].tolist() for f in spec.item_features}
            )
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
    spec, vocabs = loaded.model.spec, loaded.model.vocabs
    histories = (
        [[] if is_missing(h) else [str(i) for i in h] for h in users["history"]]
        if "history" in users.columns
        else [[] for _ in range(len(users))]
    )
    encoded = encode_users(
        spec,
        vocabs,
        [str(u) for u in users.index],
        {f.name: users[f.name].tolist() for f in spec.user_features if f.name in users.columns},
        histories,
    )
    return embed_users(loaded.model, encoded)


# --------------------------------------------------------------------------- publishing


def notify_redis(url: str, prefix: str, version: str) -> int:
    """SET `{prefix}active_index` and PUBLISH the version on `{prefix}index_published`; returns the number of
    subscribers that received it. Raises redis.RedisError (or OSError) when Redis cannot be reached."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        client.set(f"{prefix}active_index", version)
        return int(client.publish(f"{prefix}index_published", version))
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
        manifest = artifacts.read_manifest(store.index_dir(active), "index")
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
    redis_prefix: str = "twotower:",
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
    version = artifacts.new_version(INDEX_VERSION_PREFIX)
    timings = {"load_s": time.perf_counter() - started}
    with artifacts.publishing(store.index_dir(version)) as tmp:
        # Written first: a catalog Parquet cannot hold fails before the expensive part.
        _write_items(items, tmp / ITEMS_FILE, source)
        start = time.perf_counter()
        vectors = embed_catalog(model, items, progress=progress)  # (N, D)
        timings["embed_s"] = time.perf_counter() - start
        start = time.perf_counter()
        queries = user_queries(loaded)
        item_index, report = build_index(
            vectors,
            items.index.tolist(),
            resolved,
            recall_target,
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
                "catalog_sha256": digest,
                "catalog_source": source,
                "items_file": ITEMS_FILE,
                "new_items": new_items,
                "normalized": bool(model.config.normalize),
                "recipe_requested": recipe,
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
        recall_target,
        n,
        time.perf_counter() - started,
    )
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
