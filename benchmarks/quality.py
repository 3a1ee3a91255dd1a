"""Retrieval quality on the DESIGN §4 protocol, beside the published baselines.

    python -m benchmarks.quality --data ../shared/data/ml-100k --seeds 0,1,2

For each split seed: one global uniform random 80/20 split of the rating rows; popularity; the two-tower model
with each loss (validation slice carved from the 80% for early stopping); implicit ALS (the `implicit` package)
with factors, regularization and alpha tuned on the same validation slice; EASE (Steck 2019, the closed-form
item-item model, lambda tuned on that slice) and its rank-D truncated SVD, as reference points for a linear model
of full rank and of the two-tower's embedding size. Every model is scored by
`training.evaluate.Protocol`: full ranking over the catalog through an exact FAISS inner-product index, the
user's training items excluded, P@10 / R@10 / NDCG@10 averaged over test users.

Writes benchmarks/results/quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from training.config import TrainConfig
from training.data import load_dataset
from training.dataset import Dataset, split_random
from training.evaluate import Protocol, RankingMetrics, evaluate
from training.model import TowerConfig
from training.train import fit

RESULTS = Path(__file__).parent / "results"
PROTOCOL = (
    "MovieLens 100K, every rating a positive, global uniform random 80/20 split of rating rows, validation carved "
    "from the 80%, full ranking over all items with the user's training items excluded, metrics @10 averaged over "
    "test users (NDCG binary gains, log2 discount, IDCG over min(|test|, 10)); mean ± std over split seeds"
)
# Recommenders.jl README, same protocol (DESIGN §4).
PUBLISHED = [
    {"model": "Popularity (published)", "ndcg@10": 0.2197, "recall@10": 0.1182, "precision@10": 0.1897},
    {"model": "ItemKNN (published)", "ndcg@10": 0.3986},
    {"model": "BPR-MF (published)", "ndcg@10": 0.4083},
    {"model": "SLIM (published)", "ndcg@10": 0.4359},
    {"model": "implicit MF (published)", "ndcg@10": 0.4402},
]
# The tuned configuration per loss, chosen on validation NDCG@10 (split seed 0; see docs/loss.md): user tower =
# mean of the history's item embeddings (no user id, no user features: both overfit here), item tower = item id
# + genres + year embeddings, each tower the SUM of its parts (no learned projection), unnormalised inner product,
# small embedding init, full-batch steps (all users per step) with Adam at 1e-2, 30% of each user's items as
# history (the rest are targets), then a refit on all training rows for the early-stopped number of epochs.
# The defaults of TrainConfig / TowerConfig are that recipe, except that MovieLens users' features are left out.
_TOWER = TowerConfig(use_user_features=False)
TWO_TOWER_CONFIGS: dict[str, TrainConfig] = {
    loss: TrainConfig(loss=loss, tower=_TOWER) for loss in ("softmax", "bpr", "triplet")
}
EASE_LAMBDAS = (100.0, 200.0, 300.0, 500.0, 1000.0)
ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 2.0, 5.0, 10.0)}

log = logging.getLogger("benchmarks.quality")


def _matrix(rows: pd.DataFrame, users: list[str], items: list[str]) -> sp.csr_matrix:
    user_pos = {u: i for i, u in enumerate(users)}
    item_pos = {it: i for i, it in enumerate(items)}
    return sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows.user_id.map(user_pos), rows.item_id.map(item_pos))),
        shape=(len(users), len(items)),
    )


def implicit_als(
    dataset: Dataset, train: pd.DataFrame, test: pd.DataFrame, seed: int
) -> tuple[RankingMetrics, dict[str, Any]]:
    """implicit's ALS, grid-tuned on a validation slice of the training rows, refit on all of them."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    items = list(dataset.items.index)

    def fit_score(rows: pd.DataFrame, held: pd.DataFrame, params: dict[str, Any]) -> RankingMetrics:
        users = sorted(set(rows.user_id))
        model = AlternatingLeastSquares(**params, iterations=15, random_state=seed)
        model.fit(_matrix(rows, users, items), show_progress=False)
        protocol = Protocol(items, rows, held)
        position = {u: i for i, u in enumerate(users)}
        user_factors = np.stack(
            [
                model.user_factors[position[u]] if u in position else np.zeros(model.factors, np.float32)
                for u in protocol.users
            ]
        )
        return protocol.score(user_factors, model.item_factors)

    fit_rows, val_rows = split_random(train, TrainConfig().val_fraction, seed=seed + 10_000)
    grid = [dict(zip(ALS_GRID, values, strict=True)) for values in itertools.product(*ALS_GRID.values())]
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        scored = [(fit_score(fit_rows, val_rows, params).ndcg, params) for params in grid]
        best_ndcg, best = max(scored, key=lambda pair: pair[0])
        log.info("ALS seed %d: best validation NDCG@10 %.4f with %s", seed, best_ndcg, best)
        return fit_score(train, test, best), {**best, "val_ndcg@10": best_ndcg}


def ease(
    dataset: Dataset, train: pd.DataFrame, test: pd.DataFrame, seed: int, rank: int
) -> tuple[RankingMetrics, RankingMetrics, dict[str, Any]]:
    """EASE (Steck 2019, *Embarrassingly shallow autoencoders*): the item-item matrix B minimising
    ||X - XB||² + λ||B||² with diag(B) = 0, in closed form; a user's scores are x_u B. Also its truncated SVD
    B ≈ (U_r S_r) V_rᵀ: user vectors x_u U_r S_r and item vectors V_r, an inner-product model of the two-tower's
    shape. λ is tuned on the validation slice for each (full rank and rank r) and both are refit on all the
    training rows. Returns (full-rank metrics, rank-r metrics, chosen λs)."""
    items = list(dataset.items.index)

    def solve(rows: pd.DataFrame, lam: float) -> np.ndarray:
        x = _matrix(rows, sorted(set(rows.user_id)), items).astype(np.float64)
        gram = (x.T @ x).toarray()
        gram[np.diag_indices_from(gram)] += lam
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        weights[np.diag_indices_from(weights)] = 0.0
        return weights

    def score(rows: pd.DataFrame, held: pd.DataFrame, lam: float) -> tuple[RankingMetrics, RankingMetrics]:
        weights = solve(rows, lam)
        protocol = Protocol(items, rows, held)
        # the test users' training items as rows (a test user absent from `rows` gets an empty one)
        x = _matrix(rows[rows.user_id.isin(protocol.users)], protocol.users, items).toarray()
        left, singular, right = np.linalg.svd(weights)
        full = protocol.score(x @ weights, np.eye(len(items), dtype=np.float32))
        truncated = protocol.score(x @ (left[:, :rank] * singular[:rank]), right[:rank].T)
        return full, truncated

    fit_rows, val_rows = split_random(train, TrainConfig().val_fraction, seed=seed + 10_000)
    scored = {lam: score(fit_rows, val_rows, lam) for lam in EASE_LAMBDAS}
    best_full = max(EASE_LAMBDAS, key=lambda lam: scored[lam][0].ndcg)
    best_rank = max(EASE_LAMBDAS, key=lambda lam: scored[lam][1].ndcg)
    log.info("EASE seed %d: λ %g (full rank), λ %g (rank %d)", seed, best_full, best_rank, rank)
    final = {lam: score(train, test, lam) for lam in {best_full, best_rank}}  # usually one λ: solved once
    return final[best_full][0], final[best_rank][1], {"lambda": best_full, "lambda_rank": best_rank}


def run(dataset: Dataset, seeds: list[int], losses: list[str], with_als: bool) -> dict[str, Any]:
    per_model: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, seconds: float, metrics: RankingMetrics, **extra: Any) -> None:
        per_model.setdefault(name, []).append({**metrics.as_dict(), "train_seconds": seconds, **extra})
        log.info("seed %s %-22s NDCG@10 %.4f (%.1f s)", extra.get("seed"), name, metrics.ndcg, seconds)

    for seed in seeds:
        train, test = split_random(dataset.interactions, 0.2, seed=seed)
        protocol = Protocol(list(dataset.items.index), train, test)
        started = time.perf_counter()
        record("popularity", time.perf_counter() - started, protocol.popularity(train), seed=seed)
        for loss in losses:
            config = TrainConfig(**{**TWO_TOWER_CONFIGS[loss].__dict__, "seed": seed})
            started = time.perf_counter()
            result = fit(dataset, train, config, progress=False)
            seconds = time.perf_counter() - started
            record(
                f"two-tower ({loss})",
                seconds,
                evaluate(result.model, dataset, train, test),
                seed=seed,
                best_epoch=result.best_epoch,
            )
        if with_als:
            started = time.perf_counter()
            metrics, params = implicit_als(dataset, train, test, seed)
            # the time includes the grid: tuning is part of what a user of this peer pays
            record("implicit ALS (tuned)", time.perf_counter() - started, metrics, seed=seed, params=params)
        started = time.perf_counter()
        rank = TWO_TOWER_CONFIGS["softmax"].tower.dim
        full, truncated, lambdas = ease(dataset, train, test, seed, rank)
        seconds = time.perf_counter() - started
        record("EASE (tuned)", seconds, full, seed=seed, params=lambdas)
        record(f"EASE rank {rank} (SVD)", seconds, truncated, seed=seed, params=lambdas)

    rows = []
    for name, runs in per_model.items():
        row: dict[str, Any] = {"model": name, "seeds": [r["seed"] for r in runs]}
        for metric in ("ndcg@10", "recall@10", "precision@10"):
            values = np.array([r[metric] for r in runs])
            row[metric], row[f"{metric}_std"] = float(values.mean()), float(values.std())
        row["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
        row["runs"] = runs
        rows.append(row)
    return {
        "protocol": PROTOCOL,
        "dataset": dataset.name,
        "rows": rows,
        "published": PUBLISHED,
        "torch_threads": torch.get_num_threads(),
    }


def table(result: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], metric: str) -> str:
        if metric not in row:
            return "–"
        std = row.get(f"{metric}_std")
        return f"{row[metric]:.4f} ± {std:.4f}" if std is not None else f"{row[metric]:.4f}"

    lines = ["| model | NDCG@10 | R@10 | P@10 | train s |", "|---|---|---|---|---|"]
    for row in sorted(result["rows"], key=lambda r: -r["ndcg@10"]):
        lines.append(
            f"| {row['model']} | {cell(row, 'ndcg@10')} | {cell(row, 'recall@10')} | "
            f"{cell(row, 'precision@10')} | {row['train_seconds']:.1f} |"
        )
    for row in result["published"]:
        lines.append(
            f"| {row['model']} | {cell(row, 'ndcg@10')} | {cell(row, 'recall@10')} | {cell(row, 'precision@10')} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MovieLens 100K folder (never copied into the repository)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split seeds")
    parser.add_argument("--losses", default="softmax,bpr,triplet")
    parser.add_argument("--no-als", action="store_true", help="skip implicit ALS")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    result = run(
        load_dataset(args.data), [int(s) for s in args.seeds.split(",")], args.losses.split(","), not args.no_als
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
