"""Heavy-tailed synthetic data at scale, written as a user would bring it: `interactions.parquet` (user_id,
item_id, timestamp; integer ids), `users.parquet` (user_id, segment) and `items.parquet` (item_id, genres, year).

    python -m benchmarks.synthetic_large --interactions 20000000 --users 500000 --items 200000 --out DIR

Planted structure a model can learn: every user and item belongs to one of `clusters` clusters; a user's items come
mostly from its own cluster, by popularity within it, and the rest from the whole catalog by popularity. Item
popularity is Zipf-like, user activity log-normal (a few users with thousands of items), and some pairs repeat
(the reader keeps the latest). Generated and written in chunks of users, so memory stays a few arrays wide.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_USERS = 50_000
IN_CLUSTER = 0.8
ACTIVITY_SIGMA = 1.2
MAX_ITEMS_PER_USER = 20_000


def write(folder: Path, interactions: int, users: int, items: int, clusters: int = 50, seed: int = 0) -> Path:
    """Write the three tables under `folder` (created) and return it; the same arguments give the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_cluster = rng.integers(0, clusters, items)
    popularity = 1.0 / (10.0 + rng.permutation(items)) ** 0.9
    global_cdf = np.cumsum(popularity) / popularity.sum()
    members = [np.flatnonzero(item_cluster == c) for c in range(clusters)]
    member_cdf = [np.cumsum(popularity[m]) / popularity[m].sum() for m in members]
    user_cluster = rng.integers(0, clusters, users)
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, users)
    counts = np.clip(np.round(activity / activity.sum() * interactions), 2, MAX_ITEMS_PER_USER).astype(np.int64)

    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    with pq.ParquetWriter(folder / "interactions.parquet", schema) as writer:
        for start in range(0, users, CHUNK_USERS):
            chunk = np.arange(start, min(start + CHUNK_USERS, users))
            user = np.repeat(chunk, counts[chunk])
            own = rng.random(len(user)) < IN_CLUSTER
            item = np.searchsorted(global_cdf, rng.random(len(user))).clip(max=items - 1)
            for c in np.unique(user_cluster[chunk]):
                rows = np.flatnonzero(own & (user_cluster[user] == c))
                picks = np.searchsorted(member_cdf[c], rng.random(len(rows))).clip(max=len(members[c]) - 1)
                item[rows] = members[c][picks]
            timestamp = 1_600_000_000 + rng.integers(0, 365 * 86_400, len(user))
            writer.write_table(pa.table([user, item, timestamp], schema=schema))

    segment = np.where(rng.random(users) < 0.8, user_cluster, rng.integers(0, clusters, users))
    pq.write_table(
        pa.table({"user_id": np.arange(users), "segment": pa.array([f"s{s}" for s in segment])}),
        folder / "users.parquet",
    )
    extra = rng.integers(0, clusters, items)
    genres = [[f"g{c}", f"g{e}"] if e != c else [f"g{c}"] for c, e in zip(item_cluster, extra, strict=True)]
    pq.write_table(
        pa.table({"item_id": np.arange(items), "genres": genres, "year": rng.integers(1950, 2024, items)}),
        folder / "items.parquet",
    )
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    write(args.out, args.interactions, args.users, args.items, args.clusters, args.seed)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
