"""The `Dataset` every loader returns, and what works on one: the split, histories, the users table, and the
synthetic generator.

A `Dataset` is three tables with string ids:
- `interactions`: columns user_id, item_id (str), timestamp (int64), weight (float32); one row per event;
- `users`: indexed by user_id, one column per raw user feature (what `FeatureSpec.user_features` names);
- `items`: indexed by item_id, one column per raw item feature; multi-valued features are lists of str.
plus the `FeatureSpec` that fits those columns. `users` and `items` cover every id of the interactions (an id
missing from a feature table gets missing features: NaN/None, [] for multi-valued ones; see `cover_ids`) and keep
rows without interactions (the catalog is the whole item table).

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

from training.features import FeatureDef, FeatureSpec

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Interactions, users and items tables with string ids, and the feature spec that fits them (module docstring)."""

    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    spec: FeatureSpec

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.interactions):,} interactions, "
            f"{self.interactions.user_id.nunique():,} users, {len(self.items):,} catalog items"
        )


Column: TypeAlias = Sequence[Any] | np.ndarray | pd.Series


def make_interactions(
    users: Column,
    items: Column,
    timestamps: Column | None = None,
    weights: Column | None = None,
    source: str | Path | None = None,
) -> pd.DataFrame:
    """The canonical interactions table; duplicate (user, item) pairs keep their latest event (and are
    counted). `source` (the file read) only makes that log message say where the duplicates came from."""
    n = len(users)
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str).to_numpy(dtype=object),
            "item_id": pd.Series(items, dtype=str).to_numpy(dtype=object),
            "timestamp": np.asarray(timestamps if timestamps is not None else np.arange(n), dtype=np.int64),
            "weight": np.asarray(weights if weights is not None else np.ones(n), dtype=np.float32),
        }
    )
    frame = frame.sort_values("timestamp", kind="stable")
    deduped = frame.drop_duplicates(["user_id", "item_id"], keep="last")
    if len(deduped) < n:
        log.warning(
            "%sdropped %d duplicate (user, item) interactions, kept the latest of each",
            f"{source}: " if source else "",
            n - len(deduped),
        )
    return deduped.reset_index(drop=True)


# Decade buckets of release years, shared by the MovieLens specs and the synthetic catalog.
YEAR_BOUNDARIES = tuple(float(y) for y in range(1930, 2030, 10))


def cover_ids(table: pd.DataFrame, ids: pd.Series, multi: Sequence[str], source: Path) -> pd.DataFrame:
    """`table` plus a row with missing features (NaN; [] for the `multi` columns) for each of `ids` it
    lacks, so every user and item of the interactions is described; rows without interactions stay too."""
    extra = pd.unique(ids[~ids.isin(table.index)].to_numpy())
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


def bare_table(ids: pd.Series, name: str) -> pd.DataFrame:
    """A table of the distinct `ids` with no feature columns (the format has no such table)."""
    return pd.DataFrame(index=pd.Index(pd.unique(ids.to_numpy()), name=name, dtype=object))


def histories(rows: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's items, newest first (the order the service keeps in Redis)."""
    ordered = rows.sort_values("timestamp", ascending=False, kind="stable")
    return {str(user): list(items) for user, items in ordered.groupby("user_id", sort=False).item_id}


def users_table(dataset: Dataset, rows: pd.DataFrame) -> pd.DataFrame:
    """Raw user features plus history (newest first) for every user in `rows`: what load-features serves from."""
    hist = histories(rows)
    users = sorted(hist)
    table = dataset.users.reindex(users).copy()
    table["history"] = [hist[u] for u in users]
    return table.rename_axis("user_id")


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
    interactions = make_interactions(
        [f"u{u}" for u in user_idx],
        [f"i{i}" for i in item_idx],
        np.arange(len(user_idx)) * 60 + 1_000_000_000,
    )

    segment = np.where(rng.random(n_users) < 0.8, user_cluster, rng.integers(0, n_clusters, n_users))
    users = pd.DataFrame(
        {"segment": [f"s{s}" for s in segment], "region": [f"r{r}" for r in rng.integers(0, 5, n_users)]},
        index=pd.Index([f"u{u}" for u in range(n_users)], name="user_id"),
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
        index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"),
    )
    name = f"synthetic-{n_users}u-{n_items}i-{n_clusters}c-s{seed}"
    return Dataset(name, interactions, users, items, SYNTHETIC_SPEC)


# --------------------------------------------------------------------------- split (DESIGN §4)


def split_random(interactions: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One global uniform random split of interaction rows: (rest, held out `fraction`)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(interactions), dtype=bool)
    held[rng.permutation(len(interactions))[: round(len(interactions) * fraction)]] = True
    return interactions[~held].reset_index(drop=True), interactions[held].reset_index(drop=True)
