"""Replay benchmark: the feedback loop measured as an operator would, by replaying real history through the
running service.

    python -m benchmarks.replay --data ../shared/data/ml-100k

1. The interactions in time order; the first 80% of them (`--train-share`) are the base, written as generic
   tables (interactions, users and items with their feature columns) that `twotower train --holdout 0` trains
   the initial model on; `twotower reindex` publishes its index.
2. A real Redis (a redis-server on a free port) and the real service (uvicorn, `service.app:create_app`) on that
   model; `twotower load-features` loads the base users' features and histories.
3. The last 20% are replayed in time order through HTTP, one client: for each event, first
   `POST /v1/recommendations {"user_id", "k": 10, "exclude_seen": true}`, scored by whether the event's item is
   in the answer (HitRate@10) and where (NDCG@10 of one relevant item: 1 / log2(rank + 1)); then, except when
   frozen, `POST /v1/events` with the event's timestamp. Rows:
   - `frozen`: the initial model, no events posted (histories as of the base);
   - `live`: the initial model, every event posted (histories updated live, no retraining);
   - `retrain`: as live, with `twotower retrain` (export -> train warm-started -> reindex -> publish) started at
     every `--retrain-every` of the replayed events; the service swaps to each published index while the replay
     goes on. A retrain still running at the next boundary is waited for there, so no window goes without one;
   - `popularity`: the base's 10 most popular items, the user's seen items excluded (the floor; computed here).
   Between rows Redis is emptied, the base users reloaded and the initial index made active again.
4. Reports per row `hit_rate@10`, `ndcg@10`, `requests`, recommendation latency `p50_ms` / `p99_ms` and the user
   cache's hit rate (from `/metrics`); writes `benchmarks/results/replay.json` (`{"rows": {...}}`), a table and
   `docs/replay.png` (hit rate over the replay, per row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.serve import PREFIX, cache_lookups, load_users, log, server

RESULTS = Path(__file__).resolve().parent / "results" / "replay.json"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "replay.png"
K = 10
ROWS = ("frozen", "live", "retrain")


@dataclass
class Replay:
    """The events to replay and what each row measured."""

    users: np.ndarray  # (E,) str
    items: np.ndarray  # (E,) str
    timestamps: np.ndarray  # (E,) float seconds
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def write_base(data: str | None, folder: Path, train_share: float, synthetic_users: int) -> Replay:
    """Split the interactions in time order; write the base as generic tables under `folder`; return the rest."""
    from training.data import load_dataset
    from training.dataset import synthetic

    dataset = load_dataset(data) if data else synthetic(n_users=synthetic_users, n_items=synthetic_users, seed=0)
    rows = dataset.interactions  # in time order
    cut = int(len(rows) * train_share)
    frame = rows.frame()
    base, rest = frame.iloc[:cut], frame.iloc[cut:]
    folder.mkdir(parents=True, exist_ok=True)
    base[["user_id", "item_id", "timestamp"]].to_parquet(folder / "interactions.parquet", index=False)
    # Feature columns as the dataset holds them (a text column like a title would only be noise here).
    for table, name in ((dataset.users, "users"), (dataset.items, "items")):
        spec = dataset.spec.user_features if name == "users" else dataset.spec.item_features
        columns = [f.name for f in spec if f.name in table.columns]
        out = table[columns].reset_index()
        out.to_parquet(folder / f"{name}.parquet", index=False)
    log(f"{dataset.describe()}: base {len(base):,} rows, replaying {len(rest):,}")
    return Replay(
        rest["user_id"].to_numpy(dtype=object),
        rest["item_id"].to_numpy(dtype=object),
        rest["timestamp"].to_numpy(dtype=np.float64),
    )


def twotower(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "training", *args]
    env = {**os.environ, "TWOTOWER_REDIS_PREFIX": PREFIX}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if check and done.returncode != 0:
        raise RuntimeError(f"twotower {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


# --------------------------------------------------------------------------- one row


def replay_row(
    client: Any, replay: Replay, *, post: bool, boundaries: Sequence[int] = (), on_boundary: Any = None
) -> dict[str, Any]:
    hits = np.zeros(len(replay.users), dtype=bool)
    gains = np.zeros(len(replay.users))
    latencies = np.zeros(len(replay.users))
    versions: set[str] = set()
    before = cache_lookups(str(client.base_url).rstrip("/"))
    marks = set(boundaries)
    for i, (user, item, stamp) in enumerate(zip(replay.users, replay.items, replay.timestamps, strict=True)):
        if i in marks and on_boundary is not None:
            on_boundary(i)
        started = time.perf_counter()
        answer = client.post("/v1/recommendations", json={"user_id": user, "k": K, "exclude_seen": True})
        latencies[i] = (time.perf_counter() - started) * 1000
        answer.raise_for_status()
        body = answer.json()
        versions.add(body["index_version"])
        ranked = [entry["item_id"] for entry in body["items"]]
        if item in ranked:
            hits[i], gains[i] = True, 1 / np.log2(ranked.index(item) + 2)
        if post:
            client.post("/v1/events", json={"user_id": user, "item_id": item, "timestamp": stamp}).raise_for_status()
    after = cache_lookups(str(client.base_url).rstrip("/"))
    lookups = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(lookups.values())
    return {
        "hit_rate@10": float(hits.mean()),
        "ndcg@10": float(gains.mean()),
        "requests": len(hits),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "user_cache_hit_rate": round(lookups.get("hit", 0) / total, 3) if total else None,
        "index_versions_served": len(versions),
        "hits_by_tenth": [float(chunk.mean()) for chunk in np.array_split(hits, 10)],
    }


def popularity_row(base: Path, replay: Replay) -> dict[str, Any]:
    """The base's most popular items, each user's seen items (base, then replayed so far) excluded."""
    frame = pd.read_parquet(base / "interactions.parquet")
    ranked = frame["item_id"].value_counts().index.tolist()
    seen: dict[str, set[str]] = {}
    for user, item in zip(frame["user_id"], frame["item_id"], strict=True):
        seen.setdefault(user, set()).add(item)
    hits = np.zeros(len(replay.users), dtype=bool)
    gains = np.zeros(len(replay.users))
    for i, (user, item) in enumerate(zip(replay.users, replay.items, strict=True)):
        mine = seen.setdefault(user, set())
        top = [x for x in ranked[: K + len(mine)] if x not in mine][:K]
        if item in top:
            hits[i], gains[i] = True, 1 / np.log2(top.index(item) + 2)
        mine.add(item)
    tenths = [float(chunk.mean()) for chunk in np.array_split(hits, 10)]
    return {"hit_rate@10": float(hits.mean()), "ndcg@10": float(gains.mean()), "requests": len(hits),
            "p50_ms": None, "p99_ms": None, "hits_by_tenth": tenths}  # fmt: skip


class Retrainer:
    """Runs `twotower retrain` in the background, one at a time; `at_boundary` waits for a running one first."""

    def __init__(self, root: Path, base: Path, redis_url: str, train_args: Sequence[str]) -> None:
        self.command = ["retrain", "--data", str(base), "--artifacts", str(root), "--redis-url", redis_url,
                        "--redis-prefix", PREFIX, "--no-cache", "-q", *train_args]  # fmt: skip
        self.thread: threading.Thread | None = None
        self.runs: list[dict[str, Any]] = []

    def _run(self, at: int) -> None:
        started = time.perf_counter()
        done = twotower(*self.command, check=False)
        summary = done.stdout[done.stdout.find("{") :] if "{" in done.stdout else "{}"
        try:
            record = json.loads(summary)
        except ValueError:
            record = {"error": done.stderr[-500:]}
        kept = ("published", "reason", "gate_events", "gate_users", "gate_ndcg", "previous_gate_ndcg",
                "popularity_gate_ndcg", "warm_start")  # fmt: skip
        self.runs.append({"at_event": at, "seconds": round(time.perf_counter() - started, 1),
                          "exit": done.returncode, **{k: record.get(k) for k in kept}})  # fmt: skip
        log(f"  retrain at event {at}: {self.runs[-1]['reason'] or record.get('error')}")

    def at_boundary(self, at: int) -> None:
        self.wait()
        self.thread = threading.Thread(target=self._run, args=(at,), daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def stack(work: Path, base: Path, train_args: Sequence[str]) -> Iterator[tuple[Path, Any, str, str]]:
    """Train and publish the initial model, start Redis and the service; yields (root, redis, initial index, URL)."""
    from service.redis_server import EmbeddedRedis, free_port
    from training.artifacts import ArtifactStore

    root = work / "artifacts"
    log("training the initial model on the base ...")
    twotower("train", "--data", str(base), "--artifacts", str(root), "--holdout", "0", "--no-cache", "-q", *train_args)
    twotower("reindex", "--artifacts", str(root), "-q")
    initial = ArtifactStore(root).active_index()
    assert initial is not None
    redis = EmbeddedRedis(work / "redis", port=free_port())
    redis.start()
    try:
        env = {"TWOTOWER_POLL_SECONDS": "1", "TWOTOWER_MAX_HISTORY": "200"}
        with server(root, work / "data", redis.url, app="service.app:create_app", extra_env=env) as url:
            yield root, redis, initial, url
    finally:
        redis.stop()


def reset(root: Path, redis: Any, initial: str, work: Path) -> None:
    """Empty Redis, reload the base users, make the initial index active again (and announce it)."""
    import redis as redis_sync

    from training.artifacts import ArtifactStore
    from training.reindex import notify_redis

    client = redis_sync.Redis.from_url(redis.url)
    client.flushdb()
    client.close()
    ArtifactStore(root).set_active_index(initial)
    load_users(root, redis.url, work / "data")
    notify_redis(redis.url, PREFIX, initial)


def _wait_for_index(client: Any, version: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").json().get("index_version") != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not swap back to index {version}")
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    train_args = args.train_args.split() if args.train_args else []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        work = Path(tmp)
        replay = write_base(args.data, work / "base", args.train_share, args.synthetic_users)
        if args.max_events:
            replay = Replay(replay.users[: args.max_events], replay.items[: args.max_events],
                            replay.timestamps[: args.max_events])  # fmt: skip
        replay.rows["popularity"] = popularity_row(work / "base", replay)
        step = max(1, int(len(replay.users) * args.retrain_every))
        boundaries = list(range(step, len(replay.users), step))
        retrains: list[dict[str, Any]] = []
        with stack(work, work / "base", train_args) as (root, redis, initial, url), httpx.Client(
            base_url=url, timeout=60
        ) as client:  # fmt: skip
            for name in ROWS:
                reset(root, redis, initial, work)
                _wait_for_index(client, initial)
                log(f"replaying {len(replay.users):,} events: {name} ...")
                row_started = time.perf_counter()
                if name == "retrain":
                    retrainer = Retrainer(root, work / "base", redis.url, [*train_args, *args.retrain_args.split()])
                    row = replay_row(client, replay, post=True, boundaries=boundaries,
                                     on_boundary=retrainer.at_boundary)  # fmt: skip
                    retrainer.wait()
                    retrains = retrainer.runs
                    row["retrains"] = len(retrains)
                    row["retrains_published"] = sum(bool(r["published"]) for r in retrains)
                else:
                    row = replay_row(client, replay, post=name != "frozen")
                row["seconds"] = round(time.perf_counter() - row_started, 1)
                replay.rows[name] = row
                log(f"  {name}: HitRate@10 {row['hit_rate@10']:.4f}, NDCG@10 {row['ndcg@10']:.4f}")
    return {
        "data": args.data or f"synthetic ({args.synthetic_users} users)",
        "train_share": args.train_share,
        "retrain_every": args.retrain_every,
        "train_args": train_args,
        "retrain_args": args.retrain_args.split(),
        "rows": {name: replay.rows[name] for name in (*ROWS, "popularity")},
        "retrain_runs": retrains,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| row | HitRate@10 | NDCG@10 | requests | p50 ms | p99 ms | user cache hits |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(
            f"| {name} | {row['hit_rate@10']:.4f} | {row['ndcg@10']:.4f} | {row['requests']} | {row['p50_ms']} | "
            f"{row['p99_ms']} | {row.get('user_cache_hit_rate')} |"
        )
    retrain = result["rows"]["retrain"]
    lines.append(f"\nretrains: {retrain.get('retrains')} started, {retrain.get('retrains_published')} published; "
                 f"{result['seconds']} s, load average {result['loadavg_1m']}")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in result["rows"].items():
        tenths = row["hits_by_tenth"]
        ax.plot(np.arange(1, len(tenths) + 1) * 10, tenths, marker="o", label=name)
    ax.set_xlabel("replayed events (%, in time order)")
    ax.set_ylabel("HitRate@10 of the next event")
    ax.set_title(f"replay: {result['data']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="dataset folder (default: built-in synthetic data)")
    parser.add_argument("--synthetic-users", type=int, default=400, help="synthetic data: users (and items)")
    parser.add_argument("--train-share", type=float, default=0.8, help="the base: this share of rows, by time")
    parser.add_argument("--retrain-every", type=float, default=0.05, help="share of replayed events per retrain")
    parser.add_argument("--max-events", type=int, default=0, help="replay only the first N events (0: all)")
    parser.add_argument("--train-args", default="", help="extra `twotower train` flags, e.g. '--epochs 5'")
    parser.add_argument("--retrain-args", default="", help="extra `twotower retrain` flags, e.g. '--tolerance 0.02'")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    print(table(result))
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
