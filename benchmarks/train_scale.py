"""Training at scale: preparation, epochs, validation and time to quality at 1M, 5M and 20M interactions, beside a
reference loop measured in the same run on the same data.

    python -m benchmarks.train_scale                      (sizes 1m,5m,20m; --sizes to choose, --quick for CI-size)

Data: heavy-tailed synthetic tables written once per size by `benchmarks.synthetic_large` (user-brought
Parquet, integer ids, repeated pairs), kept under --data-dir. For each size, each trainer runs in its own process (so
peak RSS is its own), on the DESIGN §4 split of the same rows and the same validation users:

- ours: `training.train.fit` with the default recipe at the reference's D = 64 (no refit: time to quality is about
  the fit), its time budget `--seconds`, validating every epoch. `prepare_seconds` is the time before the first
  step on a first read of the data (parse, encode, cache, split, arrays), `cached_prepare_seconds` the same on a
  re-run (the encoded cache);
- reference: what a user could write in an afternoon: user and item id embeddings (D = 64, N(0, 0.01²)), in-batch
  softmax over 4,096 (user, item) pairs with the logQ correction, SparseAdam at 1e-2, validated the same way.

Per size: `epoch_seconds`, `examples_per_second` (ours: items drawn into steps, history and positives; the
reference: pairs), `validation_seconds` (one pass), `wait_fraction` (time the trainer waited for batches),
`peak_rss_mb`, `vs_reference` (examples/s over the reference's) and `time_to_quality_ratio`: the seconds our fit
took to reach the reference's best validation NDCG@10 over the seconds the reference took to reach it (training and
validation time both; below 1 is faster). `--processes 1,2` adds, at the middle size, `twotower train --nproc N`
(torchrun, gloo) for two epochs each: examples/s with one process and with two on this machine.

Writes benchmarks/results/train_scale.json, a table, and docs/train_scale.png (validation NDCG@10 over time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "train_scale.json"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "train_scale.png"
ROOT = Path(__file__).resolve().parent.parent
# name -> (interactions drawn, users, items); after repeated pairs are merged the dataset holds a bit fewer.
SIZES = {
    "quick": (60_000, 3_000, 1_500),
    "1m": (1_200_000, 20_000, 10_000),
    "5m": (6_000_000, 100_000, 50_000),
    "20m": (24_000_000, 500_000, 200_000),
}
SECONDS = {"quick": 20, "1m": 150, "5m": 420, "20m": 900}
REFERENCE_BATCH = 4096
REFERENCE_DIM = 64
REFERENCE_LR = 1e-2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- the two trainers (child processes)


def _split(dataset: Any) -> tuple[Any, Any, Any]:
    from training.dataset import split_random
    from training.train import VALIDATION_SEED_OFFSET

    train, _ = split_random(dataset.interactions, 0.2, seed=0)
    fit_rows, val_rows = split_random(train, 0.1, seed=VALIDATION_SEED_OFFSET)
    return train, fit_rows, val_rows


def run_ours(data: Path, cache: Path, seconds: float, train: bool = True) -> dict[str, Any]:
    import torch

    from training.config import TrainConfig, with_overrides
    from training.data import load_dataset
    from training.train import fit

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    dataset = load_dataset(data, cache_dir=cache)
    loaded = time.perf_counter() - started
    rows, _, _ = _split(dataset)
    split = time.perf_counter() - started - loaded
    # D as the reference's: the same model size on both sides (the default recipe's D is chosen for quality).
    config = with_overrides(
        TrainConfig(max_seconds=seconds, eval_every=1, refit="never", seed=0, epochs=400 if train else 0),
        {"dim": REFERENCE_DIM},
    )
    result = fit(dataset, rows, config, progress=False)
    stats = result.stats
    epochs = max(int(stats["epochs"]), 1)
    return {
        "interactions": len(dataset.interactions),
        "users": int(dataset.interactions.n_users),
        "items": len(dataset.items),
        "dim": config.tower.dim,
        "load_seconds": loaded,
        "prepare_seconds": loaded + split + stats["prepare_seconds"],
        "epoch_seconds": (result.seconds - stats["prepare_seconds"] - stats["validation_seconds"]) / epochs,
        "examples_per_second": stats["examples_per_second"],
        "validation_seconds": stats["validation_seconds"] / max(len(result.curves), 1),
        "wait_fraction": stats["wait_fraction"],
        "epochs": epochs,
        "steps_per_epoch": stats["steps_per_epoch"],
        "curve": [(c["seconds"] - stats["prepare_seconds"], c["val_ndcg@10"]) for c in result.curves],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_reference(data: Path, cache: Path, seconds: float, seed: int = 0) -> dict[str, Any]:
    """The afternoon loop (module docstring), on the same split and validation users as ours."""
    import torch
    from torch import nn

    from training.config import TrainConfig
    from training.data import load_dataset
    from training.evaluate import Protocol

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    dataset = load_dataset(data, cache_dir=cache)
    _, fit_rows, val_rows = _split(dataset)
    validation = Protocol(fit_rows, val_rows, TrainConfig().val_users, seed=0)
    users = nn.Embedding(len(fit_rows.user_ids), REFERENCE_DIM, sparse=True)
    items = nn.Embedding(len(fit_rows.item_ids), REFERENCE_DIM, sparse=True)
    for table in (users, items):
        nn.init.normal_(table.weight, std=0.01)
    optimizer = torch.optim.SparseAdam([users.weight, items.weight], lr=REFERENCE_LR)
    counts = fit_rows.item_counts().astype(np.float64)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32))
    user_codes, item_codes = (
        torch.from_numpy(fit_rows.user.astype(np.int64)),
        torch.from_numpy(fit_rows.item.astype(np.int64)),
    )
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    curve, examples, validation_seconds, train_seconds, epochs = [], 0, 0.0, 0.0, 0
    while time.perf_counter() - started < seconds:
        epoch_started = time.perf_counter()
        for batch in torch.from_numpy(rng.permutation(len(fit_rows))).split(REFERENCE_BATCH):
            u, i = users(user_codes[batch]), items(item_codes[batch])  # (B, D), (B, D)
            logits = u @ i.T - log_q[item_codes[batch]]  # (B, B): the other pairs' items are the negatives
            loss = nn.functional.cross_entropy(logits, torch.arange(len(batch)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            examples += len(batch)
            if time.perf_counter() - started > seconds:
                break
        train_seconds += time.perf_counter() - epoch_started
        epochs += 1
        validated = time.perf_counter()
        with torch.no_grad():
            ndcg = validation.score(
                users.weight[torch.from_numpy(validation.users.astype(np.int64))].numpy(), items.weight.numpy()
            ).ndcg
        validation_seconds += time.perf_counter() - validated
        curve.append((time.perf_counter() - started, ndcg))
        log(f"  reference epoch {epochs}: val NDCG@10 {ndcg:.4f} at {curve[-1][0]:.0f} s")
    return {
        "examples_per_second": examples / max(train_seconds, 1e-9),
        "epoch_seconds": train_seconds / max(epochs, 1),
        "validation_seconds": validation_seconds / max(epochs, 1),
        "epochs": epochs,
        "curve": curve,
        "peak_rss_mb": peak_rss_mb(),
    }


def child(kind: str, data: Path, cache: Path, seconds: float) -> dict[str, Any]:
    """Run one trainer in a fresh process; its JSON result."""
    command = [sys.executable, "-m", "benchmarks.train_scale", "--child", kind, "--child-data", str(data)]
    command += ["--child-cache", str(cache), "--child-seconds", str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {data} failed:\n{done.stderr[-4000:]}")
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


# --------------------------------------------------------------------------- processes (torchrun)


def processes(data: Path, cache: Path, counts: list[int], epochs: int = 2) -> list[dict[str, Any]]:
    """`twotower train --nproc N` for `epochs` epochs: examples/s as the artifact's metrics report them."""
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="train-scale-") as tmp:
            command = [sys.executable, "-m", "training", "train", "-q", "--data", str(data), "--cache-dir", str(cache)]
            command += ["--artifacts", tmp, "--epochs", str(epochs), "--eval-every", str(epochs), "--refit", "never"]
            command += ["--nproc", str(n), "--holdout", "0.2", "--dim", str(REFERENCE_DIM)]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise RuntimeError(f"--nproc {n} failed:\n{done.stderr[-4000:]}")
            metrics = json.loads(done.stdout[done.stdout.index("{") :])
            rows.append(
                {
                    "processes": n,
                    "examples_per_second": metrics["examples_per_second"] * n,  # each rank reports its own
                    "fit_seconds": metrics["fit_seconds"],
                    "wall_seconds": time.perf_counter() - started,
                    "test_ndcg@10": metrics["test"]["ndcg@10"],
                }
            )
            log(
                f"  --nproc {n}: {rows[-1]['examples_per_second']:,.0f} examples/s, {rows[-1]['fit_seconds']:.0f} s fit"
            )
    return rows


# --------------------------------------------------------------------------- report


def time_to(curve: list[tuple[float, float]], quality: float) -> float | None:
    """Seconds until the curve first reaches `quality` (None if it never does)."""
    return next((seconds for seconds, ndcg in curve if ndcg >= quality), None)


def row_of(size: str, ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    best = max((ndcg for _, ndcg in reference["curve"]), default=math.nan)
    ours_time, reference_time = time_to(ours["curve"], best), time_to(reference["curve"], best)
    return {
        "size": size,
        "interactions": ours["interactions"],
        "users": ours["users"],
        "items": ours["items"],
        "prepare_seconds": ours["prepare_seconds"],
        "cached_prepare_seconds": ours.get("cached_prepare_seconds"),
        "epoch_seconds": ours["epoch_seconds"],
        "examples_per_second": ours["examples_per_second"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "validation_seconds": ours["validation_seconds"],
        "wait_fraction": ours["wait_fraction"],
        "vs_reference": ours["examples_per_second"] / reference["examples_per_second"],
        "time_to_quality_ratio": None if ours_time is None or not reference_time else ours_time / reference_time,
        "best_val_ndcg@10": max((ndcg for _, ndcg in ours["curve"]), default=math.nan),
        "reference": {**reference, "best_val_ndcg@10": best, "seconds_to_best": reference_time},
        "seconds_to_reference_best": ours_time,
        "ours": ours,
    }


def table(rows: list[dict[str, Any]], scaling: list[dict[str, Any]]) -> str:
    lines = [
        "| interactions | prepare s (cached) | epoch s | examples/s | validation s | wait | peak RSS MB | vs reference "
        "| time to quality | best val NDCG@10 (reference) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r["time_to_quality_ratio"]
        lines.append(
            f"| {r['interactions']:,} | {r['prepare_seconds']:.0f} ({r['cached_prepare_seconds']:.0f}) "
            f"| {r['epoch_seconds']:.0f} | {r['examples_per_second']:,.0f} | {r['validation_seconds']:.1f} "
            f"| {r['wait_fraction']:.2f} | {r['peak_rss_mb']:,.0f} | {r['vs_reference']:.2f} "
            f"| {'never' if ratio is None else f'{ratio:.2f}'} "
            f"| {r['best_val_ndcg@10']:.4f} ({r['reference']['best_val_ndcg@10']:.4f}) |"
        )
    if scaling:
        lines += ["", "| processes | examples/s | fit s | test NDCG@10 |", "|---:|---:|---:|---:|"]
        for s in scaling:
            speed, fit_s = f"{s['examples_per_second']:,.0f}", f"{s['fit_seconds']:.0f}"
            lines.append(f"| {s['processes']} | {speed} | {fit_s} | {s['test_ndcg@10']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for axis, r in zip(axes[0], rows, strict=True):
        for name, curve in (("two-tower (ours)", r["ours"]["curve"]), ("reference loop", r["reference"]["curve"])):
            if curve:
                seconds, ndcg = zip(*curve, strict=True)
                axis.plot(seconds, ndcg, marker="o", markersize=3, label=name)
        axis.set_title(f"{r['interactions']:,} interactions")
        axis.set_xlabel("seconds of training")
        axis.set_ylabel("validation NDCG@10")
        axis.legend(fontsize=8)
    fig.suptitle("time to quality, same data, same validation users (one shared 2-core machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1m,5m,20m", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--processes", default="1,2", help="process counts for `--nproc` at the middle size")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "twotower-train-scale")
    parser.add_argument("--seconds", type=float, default=None, help="time budget of each trainer (default per size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--child", choices=["ours", "prepare", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--child-data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        if args.child == "reference":
            result = run_reference(args.child_data, args.child_cache, args.child_seconds)
        else:
            result = run_ours(args.child_data, args.child_cache, args.child_seconds, train=args.child == "ours")
        print("RESULT " + json.dumps(result), flush=True)
        return

    from benchmarks.synthetic_large import write

    sizes = [s for s in args.sizes.split(",") if s]
    rows = []
    for size in sizes:
        data = args.data_dir / size
        if not (data / "interactions.parquet").exists():
            log(f"[{size}] writing synthetic data to {data} ...")
            write(data, *SIZES[size])
        seconds = args.seconds or SECONDS[size]
        with tempfile.TemporaryDirectory(prefix="train-scale-cache-") as cache:
            log(f"[{size}] ours, first read of the data, {seconds:.0f} s budget ...")
            ours = child("ours", data, Path(cache), seconds)
            log(f"[{size}] ours, a re-run's preparation (the encoded cache) ...")
            again = child("prepare", data, Path(cache), 0.0)
            ours["cached_prepare_seconds"] = again["prepare_seconds"]
            log(f"[{size}] reference loop, {seconds:.0f} s budget ...")
            reference = child("reference", data, Path(cache), seconds)
        rows.append(row_of(size, ours, reference))
        log(table(rows, []))
    scaling: list[dict[str, Any]] = []
    counts = [int(n) for n in args.processes.split(",") if n]
    if counts and len(sizes) > 0:
        middle = sizes[len(sizes) // 2] if len(sizes) > 1 else sizes[0]
        log(f"[{middle}] processes {counts} (torchrun, gloo) ...")
        with tempfile.TemporaryDirectory(prefix="train-scale-cache-") as cache:
            scaling = processes(args.data_dir / middle, Path(cache), counts)
    result = {
        "rows": rows,
        "processes": scaling,
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "note": "one shared 2-core machine, no GPU; the reference and ours ran one after the other",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None and rows:
        plot(rows, args.plot)
    print(table(rows, scaling))


if __name__ == "__main__":
    main()
