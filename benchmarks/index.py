"""Index benchmark: each recipe's build time, memory, single-query latency, batch throughput and recall@10
against exact search, per catalog size, on clustered synthetic embeddings.

    python -m benchmarks.index --items 100000,1000000 --dim 64

Writes `benchmarks/results/index.json` ({"rows": [...], "reindex": ..., "config": {...}}) and prints a
markdown table. Every recipe goes through `training.index.build_index`, the same code the re-index job uses,
so each row's parameters are the smallest meeting `--target` and its recall is measured against the exact
index on the same queries. The row the automatic choice (`choose_recipe`) picks is marked `auto`.

The embeddings are clustered like a trained item tower's (items of a kind sit near each other), not uniform
noise, on which no index beats a scan: `--clusters` unit-norm centroids with Gaussian noise of norm about
`--spread` times the centroid's, so neighbouring clusters overlap. Queries (users) come from the same
centroids. Single-query latency runs with one FAISS thread, as the service does; batch-32 uses all cores.

With `--ml100k PATH` the same recipes also run on a real model's embeddings: the items of MovieLens 100K
through the item tower, its users (with their training histories) through the user tower as queries; the model
is the newest ml-100k artifact under `--artifacts`, else one trained here for a few epochs.

The re-index row (`--reindex-items`, default 1M, 0 skips it) times the real job, `twotower reindex`, in a fresh
process: a model is trained here for a few epochs on a small synthetic catalog with rich item features (genres,
brand, tags, year), then a catalog of `--reindex-items` items that are ALL new (ids it has never seen; the
features carry them) is written to Parquet and handed to the job: read + validate + embed in chunks + build +
recall check against exact search (the model's users as queries) + tune + write + publish. Seconds are the
process's wall time; peak RSS is the job process's `ru_maxrss`.
"""

from __future__ import annotations

import os

# Must precede the first import of FAISS (OpenMP reads it once). On a machine shared with other jobs, idle
# OpenMP workers that spin (the default) steal the cores the busy ones need: measured here, an IVF-PQ build
# took 3x longer with two spinning threads than with one. Override from the environment if you want spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from training import artifacts
from training.index_build import RecallTargetError, build_index, choose_recipe, nlist_for

RESULTS = Path(__file__).resolve().parent / "results" / "index.json"
# {nlist} is 4·sqrt(N) for the catalog size, {m} the PQ sub-quantizer count (dim / 4: 16 bytes per 64-d item).
DEFAULT_RECIPES = ["Flat", "IVF{nlist},Flat", "HNSW32", "IVF{nlist},SQ8", "IVF{nlist},PQ{m}"]
K = 10


def clustered_embeddings(
    n_items: int, n_queries: int, dim: int, *, n_clusters: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n_items, dim) item and (n_queries, dim) query vectors, float32, around shared unit-norm centroids."""
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((n_clusters, dim), dtype=np.float32)  # (C, D)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        x = centroids[rng.integers(n_clusters, size=n)]  # (n, D)
        x += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
        return x

    return draw(n_items), draw(n_queries)


def recipe_for(template: str, n_items: int, dim: int) -> str:
    return template.format(nlist=nlist_for(n_items), m=max(1, dim // 4))


# --------------------------------------------------------------------------- the re-index job at scale

REINDEX_CLUSTERS = 100
BRANDS_PER_CLUSTER = 20
TAGS_PER_CLUSTER = 50
TAGS_PER_ITEM = 3


def reindex_items(n_items: int, seed: int, prefix: str = "i") -> pd.DataFrame:
    """A catalog with the kind of features that tell new items apart: each item has a cluster, which its first
    genre, its brand and its tags reflect (noisily: 30% carry a second genre), and a release year."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(REINDEX_CLUSTERS, size=n_items)
    extra = rng.integers(REINDEX_CLUSTERS, size=n_items)
    has_extra = rng.random(n_items) < 0.3
    brand = cluster * BRANDS_PER_CLUSTER + rng.integers(BRANDS_PER_CLUSTER, size=n_items)
    tags = cluster[:, None] * TAGS_PER_CLUSTER + rng.integers(TAGS_PER_CLUSTER, size=(n_items, TAGS_PER_ITEM))
    return pd.DataFrame(
        {
            "genres": [
                [f"g{c}", f"g{e}"] if x and e != c else [f"g{c}"]
                for c, e, x in zip(cluster.tolist(), extra.tolist(), has_extra.tolist(), strict=True)
            ],
            "brand": [f"b{b}" for b in brand.tolist()],
            "tags": [[f"t{t}" for t in row] for row in tags.tolist()],
            "year": rng.integers(1950, 2024, size=n_items),
        },
        index=pd.Index([f"{prefix}{i}" for i in range(n_items)], name="item_id"),
    )


def reindex_dataset(seed: int, n_users: int = 4000, n_items: int = 20_000, per_user: int = 20) -> Any:
    """Training data for the re-index benchmark's model: users interact mostly (85%) within their cluster."""
    from training.dataset import YEAR_BOUNDARIES, build_dataset, make_interactions
    from training.features import FeatureDef, FeatureSpec

    rng = np.random.default_rng(seed + 1)
    items = reindex_items(n_items, seed)
    item_cluster = np.array([int(g[0][1:]) for g in items["genres"]])
    members = [np.flatnonzero(item_cluster == c) for c in range(REINDEX_CLUSTERS)]
    user_cluster = rng.integers(REINDEX_CLUSTERS, size=n_users)
    user_idx = np.repeat(np.arange(n_users), per_user)
    own = rng.random(len(user_idx)) < 0.85
    cluster = np.where(own, user_cluster[user_idx], rng.integers(REINDEX_CLUSTERS, size=len(user_idx)))
    item_idx = np.array([rng.choice(members[c]) for c in cluster.tolist()])
    interactions = make_interactions(
        [f"u{u}" for u in user_idx], items.index[item_idx].to_numpy(), np.arange(len(user_idx)) * 60 + 1_000_000_000
    )
    segment = np.where(rng.random(n_users) < 0.8, user_cluster, rng.integers(REINDEX_CLUSTERS, size=n_users))
    users = pd.DataFrame(
        {"segment": [f"s{s}" for s in segment]}, index=pd.Index([f"u{u}" for u in range(n_users)], name="user_id")
    )
    spec = FeatureSpec(
        user_features=(FeatureDef("segment"),),
        item_features=(
            FeatureDef("genres", "multi", max_values=2),
            FeatureDef("brand"),
            FeatureDef("tags", "multi", max_values=TAGS_PER_ITEM),
            FeatureDef("year", "bucket", boundaries=YEAR_BOUNDARIES),
        ),
        max_history=50,
    )
    return build_dataset(f"reindex-bench-{n_users}u-{n_items}i", interactions, users, items, spec)


def reindex_result(args: argparse.Namespace) -> dict[str, Any] | None:
    """Time `twotower reindex` on `--reindex-items` new catalog items in a fresh process (see the module doc)."""
    if args.reindex_items <= 0:
        return None
    from training.artifacts import ArtifactStore
    from training.config import TrainConfig
    from training.model import TowerConfig
    from training.train import train_and_save

    n_items = args.reindex_items
    with tempfile.TemporaryDirectory(prefix="reindex-bench-") as tmp:
        root = Path(tmp) / "artifacts"
        print(f"[re-index] training the benchmark's model (dim {args.dim}) ...", file=sys.stderr, flush=True)
        config = TrainConfig(epochs=args.reindex_epochs, seed=args.seed, tower=TowerConfig(dim=args.dim))
        model_dir = train_and_save(reindex_dataset(args.seed), ArtifactStore(root), config, 0.0, not args.quiet)
        assert model_dir is not None  # one process: it wrote the artifact
        print(f"[re-index] writing a catalog of {n_items:,} new items ...", file=sys.stderr, flush=True)
        catalog_path = Path(tmp) / "items.parquet"
        reindex_items(n_items, args.seed + 100, prefix="new").reset_index().to_parquet(catalog_path, index=False)
        gc.collect()
        command = [
            sys.executable,
            "-m",
            "training.cli",
            "reindex",
            "--artifacts",
            str(root),
            "--catalog",
            str(catalog_path),
            "--recall-target",
            str(args.target),
        ]
        if args.quiet:
            command.append("--quiet")
        print(f"[re-index] {' '.join(command[2:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        seconds = time.perf_counter() - start
        # Linux reports the largest terminated child's peak RSS in KiB; the job is this process's only child.
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if done.returncode != 0:
            print(done.stdout, file=sys.stderr)
            raise RuntimeError(f"`twotower reindex` exited with {done.returncode}")
        store = ArtifactStore(root)
        version = store.active_index()
        assert version is not None
        manifest = store.index_manifest(version)
    return {
        "items": n_items,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "new_items": manifest["new_items"],
        "model_version": model_dir.name,
        "recipe": manifest["recipe"],
        "params": manifest["params"],
        "recall@10": manifest["recall@10"],
        "recall_queries": manifest["recall_queries"],
        "stages_s": {**manifest["timings"], "build_s": manifest["build_s"]},
        "p50_us": manifest["latency"].get("p50_us"),
    }


# --------------------------------------------------------------------------- recipes on each set of vectors


def bench_size(n_items: int, args: argparse.Namespace, templates: Sequence[str]) -> list[dict[str, Any]]:
    items, queries = clustered_embeddings(
        n_items, args.queries, args.dim, n_clusters=args.clusters, spread=args.spread, seed=args.seed
    )
    return bench_vectors(items, queries, "clustered", args, templates)


def bench_vectors(
    items: np.ndarray, queries: np.ndarray, data: str, args: argparse.Namespace, templates: Sequence[str]
) -> list[dict[str, Any]]:
    """Every recipe (and the exact index, and the auto choice) over (N, D) item vectors and (Q, D) queries."""
    n_items, dim = items.shape
    item_ids = [str(i) for i in range(n_items)]
    auto = choose_recipe(n_items, dim, args.target)
    recipes = [recipe_for(t, n_items, dim) for t in templates]
    # The exact index is always measured: it is the reference for every speed-up in the same run.
    recipes = list(dict.fromkeys(["Flat", *recipes, auto]))
    rows: list[dict[str, Any]] = []
    for recipe in recipes:
        print(f"[{data}, {n_items:,} items] {recipe} ...", file=sys.stderr, flush=True)
        try:
            item_index, report = build_index(
                items,
                item_ids,
                recipe,
                args.target,
                queries,
                K,
                model_version="benchmark",
                progress=not args.quiet,
                seed=args.seed,
            )
            meets = True
            del item_index
        except RecallTargetError as e:
            report, meets = e.report, False
        gc.collect()
        rows.append(
            {
                "items": n_items,
                "data": data,
                "recipe": recipe,
                "params": report["params"],
                "auto": recipe == auto,
                "recall@10": report[f"recall@{K}"],
                "p50_us": report.get("p50_us", math.nan),
                "p99_us": report.get("p99_us", math.nan),
                "qps_b32": report.get("qps_b32", math.nan),
                "build_s": report["build_s"],
                "memory_mb": report["memory_mb"],
                "speedup_vs_exact": math.nan,
                "meets_target": meets,
                "tune_s": report["tune_s"],
            }
        )
    exact_p50 = next(r["p50_us"] for r in rows if r["recipe"] == "Flat")
    for row in rows:
        row["speedup_vs_exact"] = exact_p50 / row["p50_us"]
    return rows


def ml100k_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(item vectors, user vectors, model version) of an ml-100k model: the newest artifact under --artifacts
    trained on it, else one trained here (a few epochs; only the embeddings' geometry matters here)."""
    from training.artifacts import ArtifactStore, load_model
    from training.config import TrainConfig
    from training.data import load_dataset
    from training.dataset import split_random
    from training.evaluate import Protocol
    from training.features import encode_item_frame
    from training.model import embed_items, embed_users
    from training.reindex import user_queries
    from training.train import fit

    store = ArtifactStore(args.artifacts)
    for version in reversed(store.model_versions()):
        manifest = artifacts.read_manifest(store.model_dir(version), "model")
        if manifest["training"].get("dataset") == "movielens-100k":
            loaded = load_model(store.model_dir(version))
            print(f"[ml-100k] using model {version} from {store.root}", file=sys.stderr, flush=True)
            queries = user_queries(loaded, max_users=100_000)
            assert queries is not None
            return loaded.item_embeddings()[1], queries, version
    print(f"[ml-100k] no ml-100k model under {store.root}: training one ...", file=sys.stderr, flush=True)
    dataset = load_dataset(args.ml100k)
    train, _ = split_random(dataset.interactions, 0.2, seed=args.seed)
    config = TrainConfig(epochs=args.ml100k_epochs, seed=args.seed)
    model = fit(dataset, train, config, progress=not args.quiet).model
    items = encode_item_frame(dataset.spec, model.vocabs, dataset.items)
    users = Protocol(train, train).encode_users(dataset, model.vocabs, items.ids)  # every training user
    return embed_items(model, items), embed_users(model, users), "trained-here"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| data | items | recipe | params | auto | recall@10 | p50 µs | p99 µs | qps (b32) | build s | memory MB "
        "| speed-up vs exact |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        recall = f"{r['recall@10']:.3f}" + ("" if r["meets_target"] else " (below target)")
        lines.append(
            f"| {r.get('data', 'clustered')} | {r['items']:,} | {r['recipe']} | {params} "
            f"| {'**auto**' if r['auto'] else ''} | {recall} "
            f"| {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['qps_b32']:,.0f} | {r['build_s']:.1f} "
            f"| {r['memory_mb']:.0f} | {r['speedup_vs_exact']:.1f}x |"
        )
    return "\n".join(lines)


def reindex_line(result: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in result["params"].items()) or "-"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages_s"].items())
    return (
        f"re-index: {result['items']:,} items ({result['new_items']:,} new since training) through the item tower, "
        f"`twotower reindex` end to end in {result['seconds']:.1f} s (stages: {stages}), "
        f"peak RSS {result['peak_rss_mb']:,.0f} MB; {result['recipe']} {params}, recall@10 {result['recall@10']:.3f} "
        f"on {result['recall_queries']['count']} user-tower queries; load avg {result['loadavg_before']} -> "
        f"{result['loadavg_after']}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index", description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="100000,1000000", help="comma-separated catalog sizes")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=DEFAULT_RECIPES,
        metavar="FACTORY",
        help="FAISS factory strings ({nlist} = 4·sqrt(N), {m} = dim/4); Flat and the auto choice are always run",
    )
    parser.add_argument("--queries", type=int, default=1000, help="query (user) vectors per catalog size")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.2, help="noise norm relative to centroid norm")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 target each recipe is tuned to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reindex-items", type=int, default=1_000_000, help="catalog size of the re-index timing (0: skip it)"
    )
    parser.add_argument("--reindex-epochs", type=int, default=3, help="epochs of the re-index benchmark's model")
    parser.add_argument("--ml100k", type=Path, default=None, help="MovieLens 100K folder: add rows on its embeddings")
    parser.add_argument("--ml100k-epochs", type=int, default=10, help="epochs when an ml-100k model is trained here")
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="where to look for a trained ml-100k model"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = [int(s) for s in args.items.split(",") if s.strip()]
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = [row for n in sizes for row in bench_size(n, args, args.recipes)]
    ml100k_model = None
    if args.ml100k is not None:
        item_vectors, user_vectors, ml100k_model = ml100k_vectors(args)
        rows += bench_vectors(item_vectors, user_vectors, "ml-100k", args, args.recipes)
    load_reindex = os.getloadavg()
    reindex = reindex_result(args)
    if reindex is not None:
        reindex["loadavg_before"] = [round(x, 2) for x in load_reindex]
        reindex["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "rows": rows,
        "reindex": reindex,
        "config": {
            "dim": args.dim,
            "queries": args.queries,
            "clusters": args.clusters,
            "spread": args.spread,
            "recall_target": args.target,
            "k": K,
            "seed": args.seed,
            "ml100k_model": ml100k_model,
            "cpus": os.cpu_count(),
            "faiss": faiss.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "threads_batch": faiss.omp_get_max_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(args.out, result)
    print(table(rows))
    if reindex is not None:
        print("\n" + reindex_line(reindex))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
