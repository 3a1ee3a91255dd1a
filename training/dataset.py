"""The `Dataset` every loader returns, and what works on one: interactions as integer arrays, the split, each
user's items, the users table, and the synthetic generator.

A `Dataset` holds
- `interactions`: an `Interactions`, one row per (user, item) event as integer codes: `user` (int32) into
  `user_ids` (the ids sorted), `item` (int32) into `item_ids` (the catalog's order), `timestamp` (int64, rows in
  ascending order) and `weight` (float32). Every later stage (splits, batches, validation, test, the users
  table) works on these arrays: no per-row Python objects, so 100M rows fit one machine;
- `users`: indexed by user_id, one column per raw user feature (what `FeatureSpec.user_features` names);
- `items`: indexed by item_id in the same order as `interactions.item_ids`, one column per raw item feature;
  multi-valued features are lists of str;
plus the `FeatureSpec` that fits those columns. `users` and `items` cover every id of the interactions (an id
missing from a feature table gets missing features: NaN/None, [] for multi-valued ones; see `build_dataset`) and
keep rows without interactions (the catalog is the whole item table).

Offline only: the service never reads raw data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import pyarrow as pa

from training.features import FeatureDef, FeatureSpec

log = logging.getLogger(__name__)

Column: TypeAlias = Sequence[Any] | np.ndarray | pd.Series


@dataclass(frozen=True)
class UserItems:
    """Rows of interactions grouped by user, CSR-style: user `users[i]`'s items are `items[indptr[i]:indptr[i+1]]`,
    newest first (ties in row order), the order the service keeps histories in."""

    users: np.ndarray  # (U,) int32 user codes, ascending
    indptr: np.ndarray  # (U + 1,) int64
    items: np.ndarray  # (N,) int32 item codes

    def __len__(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def of(self, row: int | np.integer) -> np.ndarray:
        return self.items[self.indptr[row] : self.indptr[row + 1]]

    def rows_of(self, user_codes: np.ndarray) -> np.ndarray:
        """Row of each of `user_codes` here, -1 for users without items."""
        if not len(self.users):
            return np.full(len(user_codes), -1, dtype=np.int64)
        pos = np.searchsorted(self.users, user_codes).clip(max=len(self.users) - 1)
        return np.where(self.users[pos] == user_codes, pos, -1)


@dataclass(frozen=True)
class Interactions:
    """Interaction rows as integer arrays (see the module docstring); `take` and the split keep the vocabularies."""

    user: np.ndarray  # (N,) int32 code into user_ids
    item: np.ndarray  # (N,) int32 code into item_ids
    timestamp: np.ndarray  # (N,) int64
    weight: np.ndarray  # (N,) float32
    user_ids: np.ndarray  # (U,) str, sorted
    item_ids: np.ndarray  # (I,) str, the catalog's order

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Interactions:
        """The given rows (positions or a boolean mask), in their order, with the same vocabularies."""
        return Interactions(
            self.user[rows], self.item[rows], self.timestamp[rows], self.weight[rows], self.user_ids, self.item_ids
        )

    @property
    def n_users(self) -> int:
        """Distinct users that have rows here."""
        return int(np.count_nonzero(np.bincount(self.user, minlength=1)))

    def by_user(self) -> UserItems:
        """Each user's items, newest first (ties in row order)."""
        # Rows are in time order, so "newest first, ties in row order" is the order of `newest`, built without a
        # sort: the runs of equal timestamps, last run first, each run in row order.
        runs = np.flatnonzero(np.diff(self.timestamp, prepend=self.timestamp[:1] - 1))
        lengths = np.diff(np.append(runs, len(self)))
        first = np.cumsum(lengths[::-1]) - lengths[::-1]
        newest = np.repeat(runs[::-1] - first, lengths[::-1]) + np.arange(len(self))
        order = newest[stable_order(self.user[newest])]
        counts = np.bincount(self.user, minlength=1)
        users = np.flatnonzero(counts).astype(np.int32)
        indptr = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(counts[users], out=indptr[1:])
        return UserItems(users, indptr, self.item[order])

    def item_counts(self) -> np.ndarray:
        """(I,) rows per catalog item."""
        return np.bincount(self.item, minlength=len(self.item_ids))

    def frame(self) -> pd.DataFrame:
        """The rows as a table of str ids (for small data and for reading them: a copy, not the store)."""
        return pd.DataFrame(
            {
                "user_id": self.user_ids[self.user],
                "item_id": self.item_ids[self.item],
                "timestamp": self.timestamp,
                "weight": self.weight,
            }
        )


@dataclass
class Dataset:
    """Interactions as integer arrays, the users and items tables, and the feature spec (module docstring)."""

    name: str
    interactions: Interactions
    users: pd.DataFrame
    items: pd.DataFrame
    spec: FeatureSpec

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.interactions):,} interactions, "
            f"{self.interactions.n_users:,} users, {len(self.items):,} catalog items"
        )


# --------------------------------------------------------------------------- building a dataset


def _codes(values: Column) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes in first-seen order, the distinct values as str)."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=str).to_numpy(dtype=object))
    return codes.astype(np.int32), np.asarray(uniques, dtype=object)


def sorted_codes(codes: np.ndarray, uniques: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same codes renumbered so that `uniques` is sorted (code order = sorted id order)."""
    order = np.argsort(uniques, kind="stable")
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[codes], uniques[order]


def stable_order(keys: np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind="stable")` for non-negative integer keys, by one sort of the keys packed with their
    positions into 64 bits where they fit: several times faster than an indirect sort on tens of millions."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    keys = keys.astype(np.int64, copy=False)
    position_bits = max(1, (len(keys) - 1).bit_length())
    if int(keys.max()).bit_length() + position_bits > 63:
        return np.argsort(keys, kind="stable")
    packed = np.sort((keys << position_bits) | np.arange(len(keys), dtype=np.int64))
    return packed & ((1 << position_bits) - 1)


def interactions_from_codes(
    user: np.ndarray,
    item: np.ndarray,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    timestamps: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    source: str | Path | None = None,
) -> Interactions:
    """The canonical rows from codes: sorted by timestamp (stable; row order without timestamps), and a duplicate
    (user, item) pair keeps its latest event (counted in the log; `source` names the file read)."""
    n = len(user)
    timestamp = np.asarray(timestamps if timestamps is not None else np.arange(n), dtype=np.int64)
    weight = np.asarray(weights if weights is not None else np.ones(n), dtype=np.float32)
    rows = np.arange(n)
    order = rows if n == 0 or (np.diff(timestamp) >= 0).all() else stable_order(timestamp - timestamp.min())
    key = user[order].astype(np.int64) * max(len(item_ids), 1) + item[order]
    # The last row of each (user, item) in time order survives: sorted by (key, position), each key's last.
    by_key = stable_order(key)
    sorted_key = key[by_key]
    last = np.append(sorted_key[1:] != sorted_key[:-1], True) if n else np.zeros(0, dtype=bool)
    if not last.all():
        log.warning(
            "%sdropped %d duplicate (user, item) interactions, kept the latest of each",
            f"{source}: " if source else "",
            n - int(last.sum()),
        )
        keep = np.zeros(n, dtype=bool)
        keep[by_key[last]] = True
        order = order[keep]
    return Interactions(
        np.ascontiguousarray(user[order], dtype=np.int32),
        np.ascontiguousarray(item[order], dtype=np.int32),
        timestamp[order],
        weight[order],
        np.asarray(user_ids, dtype=object),
        np.asarray(item_ids, dtype=object),
    )


def make_interactions(
    users: Column,
    items: Column,
    timestamps: Column | None = None,
    weights: Column | None = None,
    source: str | Path | None = None,
) -> Interactions:
    """The canonical rows from raw id columns (any type; ids become str). Item codes are in first-seen order
    here; `build_dataset` renumbers them to the catalog's order."""
    user, user_ids = sorted_codes(*_codes(users))
    item, item_ids = _codes(items)
    ts = None if timestamps is None else np.asarray(timestamps, dtype=np.int64)
    w = None if weights is None else np.asarray(weights, dtype=np.float32)
    return interactions_from_codes(user, item, user_ids, item_ids, ts, w, source)


def cover_ids(table: pd.DataFrame, ids: np.ndarray, multi: Sequence[str], source: str | Path) -> pd.DataFrame:
    """`table` plus a row with missing features (NaN; [] for the `multi` columns) for each of `ids` it
    lacks (in the order given), so every user and item of the interactions is described; rows without
    interactions stay too."""
    ids = np.asarray(ids, dtype=object)
    extra = ids[pd.Index(table.index, dtype=object).get_indexer(pd.Index(ids, dtype=object)) < 0]
    if len(extra) == 0:
        return table
    log.warning(
        "%s: %d %ss appear in the interactions but not in this table; kept with missing features, e.g. %r",
        source,
        len(extra),
        table.index.name,
        extra[0],
    )
    out = table.reindex(table.index.append(pd.Index(extra, dtype=object)))
    out.index.name = table.index.name
    for name in multi:
        out[name] = [v if isinstance(v, list) else [] for v in out[name]]
    return out


def bare_table(ids: np.ndarray, name: str) -> pd.DataFrame:
    """A table of the given ids with no feature columns (the format has no such table)."""
    return pd.DataFrame(index=pd.Index(np.asarray(ids, dtype=object), name=name, dtype=object))


def build_dataset(
    name: str,
    interactions: Interactions,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    spec: FeatureSpec,
    user_source: str | Path = "users",
    item_source: str | Path = "items",
) -> Dataset:
    """A `Dataset` whose tables cover every id of `interactions` (ids missing from a table are added, in order of
    first appearance, with missing features; a missing table is a bare one), its item codes renumbered to the
    catalog's order."""
    seen_items = interactions.item_ids[pd.unique(interactions.item)]  # in order of first appearance
    multi_items = [f.name for f in spec.item_features if f.kind == "multi"]
    multi_users = [f.name for f in spec.user_features if f.kind == "multi"]
    items = (
        bare_table(seen_items, "item_id") if items is None else cover_ids(items, seen_items, multi_items, item_source)
    )
    users_seen = interactions.user_ids[np.flatnonzero(np.bincount(interactions.user, minlength=1))]
    users = (
        bare_table(users_seen, "user_id") if users is None else cover_ids(users, users_seen, multi_users, user_source)
    )
    catalog = pd.Index(items.index, dtype=object)
    recode = catalog.get_indexer(pd.Index(interactions.item_ids, dtype=object)).astype(np.int32)
    rows = Interactions(
        interactions.user,
        recode[interactions.item],
        interactions.timestamp,
        interactions.weight,
        interactions.user_ids,
        catalog.to_numpy(dtype=object),
    )
    return Dataset(name, rows, users, items, spec)


def with_events(dataset: Dataset, users: Column, items: Column, timestamps: Column, source: str = "events") -> Dataset:
    """`dataset` plus more interactions (the service's exported events, `training.event_export`): users and items
    new to it join its tables with missing features (the vocabularies a model builds from it grow), and a (user,
    item) pair seen again keeps its latest row. Merged as integer codes: the base rows' ids are not rebuilt."""
    base = dataset.interactions
    extra_users, extra_user_ids = _codes(users)
    extra_items, extra_item_ids = _codes(items)
    user_ids = _grown(base.user_ids, extra_user_ids)
    item_ids = _grown(base.item_ids, extra_item_ids)
    user = np.concatenate([base.user, pd.Index(user_ids).get_indexer(extra_user_ids)[extra_users].astype(np.int32)])
    item = np.concatenate([base.item, pd.Index(item_ids).get_indexer(extra_item_ids)[extra_items].astype(np.int32)])
    user, user_ids = sorted_codes(user, user_ids)
    stamps = np.floor(np.asarray(timestamps, dtype=np.float64)).astype(np.int64)
    rows = interactions_from_codes(
        user,
        item,
        user_ids,
        item_ids,
        np.concatenate([base.timestamp, stamps]),
        np.concatenate([base.weight, np.ones(len(stamps), dtype=np.float32)]),
        source,
    )
    return build_dataset(dataset.name, rows, dataset.users, dataset.items, dataset.spec, item_source=source,
                         user_source=source)  # fmt: skip


def _grown(known: np.ndarray, more: np.ndarray) -> np.ndarray:
    """`known` ids followed by those of `more` it lacks."""
    new = more[pd.Index(known, dtype=object).get_indexer(pd.Index(more, dtype=object)) < 0]
    return np.concatenate([np.asarray(known, dtype=object), np.asarray(new, dtype=object)])


# --------------------------------------------------------------------------- what works on a dataset

# Decade buckets of release years, shared by the MovieLens specs and the synthetic catalog.
YEAR_BOUNDARIES = tuple(float(y) for y in range(1930, 2030, 10))


def split_random(interactions: Interactions, fraction: float, seed: int) -> tuple[Interactions, Interactions]:
    """One global uniform random split of interaction rows (DESIGN §4): (rest, held out `fraction`)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(interactions), dtype=bool)
    held[rng.permutation(len(interactions))[: round(len(interactions) * fraction)]] = True
    return interactions.take(~held), interactions.take(held)


def histories(rows: Interactions) -> dict[str, list[str]]:
    """Each user's items as str ids, newest first (for small data; large data uses `Interactions.by_user`)."""
    grouped = rows.by_user()
    ids = rows.item_ids[grouped.items]
    return {
        str(rows.user_ids[user]): ids[grouped.indptr[i] : grouped.indptr[i + 1]].tolist()
        for i, user in enumerate(grouped.users)
    }


def users_table(dataset: Dataset, rows: Interactions) -> pa.Table:
    """Raw user features plus history (item ids, newest first) for every user in `rows`, as an Arrow table built
    from the arrays (a list column of every item, without one Python object per row): what load-features serves
    from and the re-index job measures recall with."""
    grouped = rows.by_user()
    ids = rows.user_ids[grouped.users]
    features = dataset.users.reindex(pd.Index(ids, dtype=object))
    table = pa.Table.from_pandas(features.reset_index(drop=True), preserve_index=False)
    item_ids = pa.array(rows.item_ids, type=pa.string())
    history = pa.ListArray.from_arrays(pa.array(grouped.indptr, type=pa.int64()), item_ids.take(grouped.items))
    return table.add_column(0, "user_id", pa.array(ids, type=pa.string())).append_column("history", history)


# --------------------------------------------------------------------------- synthetic data

SYNTHETIC_SPEC = FeatureSpec(
    user_features=(FeatureDef("segment"), FeatureDef("region")),
    item_features=(
        FeatureDef("genres", "multi", max_values=4),
        FeatureDef("year", "bucket", boundaries=YEAR_BOUNDARIES),
    ),
    max_history=100,
)


def synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_clusters: int = 10,
    interactions_per_user: int = 30,
    in_cluster: float = 0.85,
    seed: int = 0,
) -> Dataset:
    """Deterministic data with planted structure: each user and item belongs to one of `n_clusters`
    clusters; users mostly interact with popular items of their own cluster. Features carry the cluster
    noisily (a user's `segment`, an item's first genre), so a model can learn it and cold users and items are
    recoverable."""
    if n_clusters < 1 or n_items < n_clusters:
        raise ValueError(f"need 1 <= n_clusters ({n_clusters}) <= n_items ({n_items})")
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    rng.shuffle(item_cluster)
    user_cluster = rng.integers(0, n_clusters, n_users)
    # Zipf-like popularity within each cluster.
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8
    members = [np.flatnonzero(item_cluster == c) for c in range(n_clusters)]
    member_p = [popularity[m] / popularity[m].sum() for m in members]

    counts = np.maximum(3, rng.poisson(interactions_per_user, n_users))
    user_idx = np.repeat(np.arange(n_users), counts)
    own = rng.random(len(user_idx)) < in_cluster
    cluster = np.where(own, user_cluster[user_idx], rng.integers(0, n_clusters, len(user_idx)))
    item_idx = np.empty(len(user_idx), dtype=np.int64)
    for c in range(n_clusters):
        rows = np.flatnonzero(cluster == c)
        item_idx[rows] = rng.choice(members[c], size=len(rows), p=member_p[c])
    user_names = np.array([f"u{u}" for u in range(n_users)], dtype=object)
    item_names = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    interactions = make_interactions(
        user_names[user_idx], item_names[item_idx], np.arange(len(user_idx)) * 60 + 1_000_000_000
    )

    segment = np.where(rng.random(n_users) < 0.8, user_cluster, rng.integers(0, n_clusters, n_users))
    users = pd.DataFrame(
        {"segment": [f"s{s}" for s in segment], "region": [f"r{r}" for r in rng.integers(0, 5, n_users)]},
        index=pd.Index(user_names, name="user_id"),
    )
    extra = rng.integers(0, n_clusters, n_items)
    has_extra = rng.random(n_items) < 0.3
    items = pd.DataFrame(
        {
            "genres": [
                [f"g{c}", f"g{e}"] if x and e != c else [f"g{c}"]
                for c, e, x in zip(item_cluster, extra, has_extra, strict=True)
            ],
            "year": rng.integers(1950, 2024, n_items),
        },
        index=pd.Index(item_names, name="item_id"),
    )
    name = f"synthetic-{n_users}u-{n_items}i-{n_clusters}c-s{seed}"
    return build_dataset(name, interactions, users, items, SYNTHETIC_SPEC)
