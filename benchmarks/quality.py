"""Retrieval quality on the DESIGN §4 protocol over several datasets, beside the peers measured in the same run.

    python -m benchmarks.quality --data ../shared/data/ml-100k,../shared/data/citeulike-a --seeds 0,1,2

For each dataset and split seed: one global uniform random 80/20 split of the interaction rows; popularity;
implicit ALS with factors, regularization and alpha tuned on a validation slice carved from the 80%; EASE (Steck
2019, λ tuned on that slice) at full rank and its rank-D truncation (D = the two-tower's embedding size); the
two-tower's default recipe with each loss (`--losses`), with `--variants` more recipes by their settings
(e.g. `optimizer=dense`), and with `--tune-seconds S` the tuned two-tower (an Optuna search on the validation
slice, as `twotower train --tune` runs it, then the final fit; its time includes the search). Every
inner-product model is scored by `training.evaluate.Protocol` through an exact FAISS index; full-rank EASE by its
own scores (`Protocol.score_dense`); the user's training items excluded, P@10 / R@10 / NDCG@10 averaged over test
users. Peers: `benchmarks/peers.py`.

Writes benchmarks/results/quality.json ({"protocol", "datasets": [{"dataset", "rows": [...]}]}) and prints one
markdown table per dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.peers import ease, implicit_als
from training.config import TrainConfig, with_overrides
from training.data import load_dataset
from training.dataset import Dataset, split_random
from training.evaluate import Protocol, RankingMetrics, evaluate
from training.train import fit

RESULTS = Path(__file__).parent / "results"
PROTOCOL = (
    "every interaction a positive, global uniform random 80/20 split of the rows, validation carved from the 80%, "
    "full ranking over all items with the user's training items excluded, metrics @10 averaged over test users "
    "(NDCG binary gains, log2 discount, IDCG over min(|test|, 10)); mean ± std over split seeds"
)
# Recommenders.jl README, the same protocol on MovieLens 100K (DESIGN §4).
PUBLISHED = {
    "movielens-100k": [
        {"model": "Popularity (published)", "ndcg@10": 0.2197, "recall@10": 0.1182, "precision@10": 0.1897},
        {"model": "ItemKNN (published)", "ndcg@10": 0.3986},
        {"model": "BPR-MF (published)", "ndcg@10": 0.4083},
        {"model": "SLIM (published)", "ndcg@10": 0.4359},
        {"model": "implicit MF (published)", "ndcg@10": 0.4402},
    ]
}

log = logging.getLogger("benchmarks.quality")


def two_tower(dataset: Dataset, train: Any, test: Any, config: TrainConfig) -> tuple[RankingMetrics, dict[str, Any]]:
    result = fit(dataset, train, config, progress=False)
    details = {"best_epoch": result.best_epoch, "refit": result.refit, **result.stats}
    return evaluate(result.model, dataset, train, test), details


def tuned_two_tower(
    dataset: Dataset, train: Any, test: Any, config: TrainConfig, seconds: float
) -> tuple[RankingMetrics, dict[str, Any]]:
    """What `twotower train --tune` does: an Optuna search on the validation slice of `train` (within `seconds`,
    in a study of its own), then the final fit with the best settings, scored once on `test`."""
    import optuna

    from training.tune import search, summary, tuned_config

    started = time.perf_counter()
    study = search(dataset, train, config, trials=1000, seconds=seconds, storage=optuna.storages.InMemoryStorage(),
                   name=f"{dataset.name}-seed{config.seed}")  # fmt: skip
    found = summary(study, time.perf_counter() - started)
    metrics, details = two_tower(dataset, train, test, tuned_config(config, study))
    kept = ("trials", "complete", "pruned", "seconds", "best_value", "best_standard_error", "best_params",
            "chosen_is_starting_point", "chosen_value", "chosen_params")  # fmt: skip
    return metrics, {**details, "tuning": {k: found[k] for k in kept}}


def run(
    dataset: Dataset, seeds: list[int], losses: list[str], variants: list[str], with_als: bool, tune_seconds: float
) -> dict[str, Any]:
    per_model: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, seconds: float, metrics: RankingMetrics, **extra: Any) -> None:
        per_model.setdefault(name, []).append({**metrics.as_dict(), "train_seconds": seconds, **extra})
        log.info("%s seed %s %-30s NDCG@10 %.4f (%.1f s)", dataset.name, extra.get("seed"), name, metrics.ndcg, seconds)

    rank = TrainConfig().tower.dim
    for seed in seeds:
        train, test = split_random(dataset.interactions, 0.2, seed=seed)
        protocol = Protocol(train, test)
        record("popularity", 0.0, protocol.popularity(train), seed=seed)
        recipes = [(f"two-tower ({loss})", {"loss": loss}) for loss in losses]
        recipes += [(f"two-tower ({spec})", dict(kv.split("=", 1) for kv in spec.split(","))) for spec in variants]
        for name, settings in recipes:
            config = with_overrides(TrainConfig(), {**settings, "seed": seed})
            started = time.perf_counter()
            metrics, details = two_tower(dataset, train, test, config)
            record(name, time.perf_counter() - started, metrics, seed=seed, **details)
        if tune_seconds > 0:
            started = time.perf_counter()
            config = with_overrides(TrainConfig(), {"seed": seed})
            metrics, details = tuned_two_tower(dataset, train, test, config, tune_seconds)
            # the time includes the search, as for the tuned peers
            record("two-tower (softmax, tuned)", time.perf_counter() - started, metrics, seed=seed, **details)
        if with_als:
            started = time.perf_counter()
            metrics, params = implicit_als(train, test, seed, protocol)
            # the time includes the grid: tuning is part of what a user of this peer pays
            record("implicit ALS (tuned)", time.perf_counter() - started, metrics, seed=seed, params=params)
        started = time.perf_counter()
        full, truncated, lambdas = ease(train, test, seed, rank, protocol)
        seconds = time.perf_counter() - started
        record("EASE (tuned)", seconds, full, seed=seed, params=lambdas)
        record(f"EASE rank {rank} (tuned)", seconds, truncated, seed=seed, params=lambdas)

    rows = [summary_row(name, runs) for name, runs in per_model.items()]
    rows.extend(PUBLISHED.get(dataset.name, []))
    return {"dataset": dataset.name, "description": dataset.describe(), "rows": rows}


def summary_row(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: mean and std over the runs (one per split seed), and the runs themselves."""
    row: dict[str, Any] = {"model": name, "seeds": [r["seed"] for r in runs]}
    for metric in ("ndcg@10", "recall@10", "precision@10"):
        values = np.array([r[metric] for r in runs])
        row[metric], row[f"{metric}_std"] = float(values.mean()), float(values.std())
    row["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    row["runs"] = runs
    return row


def table(result: dict[str, Any]) -> str:
    def cell(row: dict[str, Any], metric: str) -> str:
        if metric not in row:
            return "–"
        std = row.get(f"{metric}_std")
        return f"{row[metric]:.4f} ± {std:.4f}" if std is not None else f"{row[metric]:.4f}"

    lines = [f"{result['description']}", "", "| model | NDCG@10 | R@10 | P@10 | train s |", "|---|---|---|---|---|"]
    for row in sorted(result["rows"], key=lambda r: ("published" in r["model"], -r["ndcg@10"])):
        seconds = f"{row['train_seconds']:.1f}" if "train_seconds" in row else ""
        lines.append(
            f"| {row['model']} | {cell(row, 'ndcg@10')} | {cell(row, 'recall@10')} | {cell(row, 'precision@10')} "
            f"| {seconds} |"
        )
    return "\n".join(lines)


def merged(earlier: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`earlier` datasets with `now`'s rows merged in, by model and split seed: a rerun seed replaces that seed's run,
    other seeds keep theirs, and the mean and std are over all of them (each run says when it was measured; the row,
    every date it holds). Datasets new in `now` are appended."""
    out = {d["dataset"]: d for d in earlier}
    for dataset in now:
        before = out.get(dataset["dataset"])
        if before is None:
            out[dataset["dataset"]] = dataset
            continue
        rows = {row["model"]: row for row in before["rows"]}
        for row in dataset["rows"]:
            old = rows.get(row["model"])
            if old is None or "runs" not in row or "runs" not in old:
                rows[row["model"]] = row
                continue
            rerun = set(row["seeds"])
            kept = [{"measured": old.get("measured"), **r} for r in old["runs"] if r["seed"] not in rerun]
            runs = sorted(kept + row["runs"], key=lambda r: r["seed"])
            rows[row["model"]] = {**summary_row(row["model"], runs),
                                  "measured": ", ".join(sorted({str(r.get("measured")) for r in runs}))}  # fmt: skip
        out[dataset["dataset"]] = {**dataset, "rows": list(rows.values())}
    return list(out.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="comma-separated dataset folders (never copied into the repo)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated split seeds")
    parser.add_argument("--losses", default="softmax,bpr,triplet", help="two-tower losses at the default recipe")
    parser.add_argument(
        "--variants",
        default="",
        help="';'-separated two-tower recipes as settings, e.g. 'optimizer=dense;batch_size=131072,eval_every=10'",
    )
    parser.add_argument("--no-als", action="store_true", help="skip implicit ALS")
    parser.add_argument(
        "--tune-seconds", type=float, default=0.0, help="add `two-tower (softmax, tuned)`: an Optuna search of this "
        "many seconds per dataset and seed on the validation slice (as `twotower train --tune`), 0: no such row",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument(
        "--merge", action="store_true", help="merge into --out: this run's seeds replace those seeds' runs of the "
        "same model and dataset, other rows and seeds stay (each run says when it was measured; see `merged`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    losses = [loss for loss in args.losses.split(",") if loss]
    variants = [v for v in args.variants.split(";") if v]
    datasets = [
        run(load_dataset(path), seeds, losses, variants, not args.no_als, args.tune_seconds)
        for path in args.data.split(",")
        if path
    ]
    measured = time.strftime("%Y-%m-%d", time.gmtime())
    for dataset in datasets:
        for row in dataset["rows"]:
            if "runs" in row:  # measured here (the published rows are quoted)
                row["measured"] = measured
                for one in row["runs"]:
                    one["measured"] = measured
    if args.merge and args.out.exists():
        datasets = merged(json.loads(args.out.read_text())["datasets"], datasets)
    result = {"protocol": PROTOCOL, "datasets": datasets, "torch_threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for dataset in datasets:
        print(table(dataset), end="\n\n")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
