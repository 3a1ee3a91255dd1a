"""Training across processes: the softmax over columns gathered from two gloo processes gives exactly the gradients
one process holding both halves of the batch computes, and a 2-process `twotower train --nproc 2` run finishes,
writes one artifact, and scores like a 1-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from service.redis_server import free_port
from training import distributed
from training.artifacts import ArtifactStore, load_model
from training.config import TrainConfig
from training.dataset import Dataset, synthetic
from training.features import EncodedItems, EncodedUsers
from training.model import TowerConfig, TwoTower
from training.train import Batch, Batches, StepLoss, TrainingData

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(id_dropout=0.0, uniform_negatives=3, tower=TowerConfig(dim=8), seed=5)
# The losses that score against every process's columns: the softmax, and the triplet mining a pool each process
# draws part of.
NORMALIZED = replace(CONFIG.tower, normalize=True)
TRIPLET = replace(CONFIG, loss="triplet", negative_pool=8, hard_negatives=3, tower=NORMALIZED)
CONFIGS = {"softmax": CONFIG, "triplet": TRIPLET}


def _setup(config: TrainConfig = CONFIG) -> tuple[Dataset, TrainingData, list[Batch]]:
    """Two batches of different users of one tiny dataset (overlapping items, as real shards have)."""
    dataset = synthetic(n_users=40, n_items=30, n_clusters=3, interactions_per_user=6, seed=4)
    data = TrainingData(dataset, dataset.interactions)
    batches = Batches(data, config, dataset.spec.max_history, world=1)
    rows = np.arange(len(data))
    return dataset, data, [batches.make(0, half, rows[half::2]) for half in (0, 1)]


def _model(dataset: Dataset, data: TrainingData, config: TrainConfig = CONFIG) -> TwoTower:
    torch.manual_seed(0)
    model = TwoTower(dataset.spec, data.vocabs, config.tower)
    with torch.no_grad():  # not the tiny init: gradients large enough to compare
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model


def _merged(data: TrainingData, a: Batch, b: Batch) -> Batch:
    """One batch holding the users, positives and columns of both (what a single process would train on)."""
    columns = np.union1d(a.columns, b.columns)
    positives = np.concatenate([a.positives, b.positives])
    rows_a = len(a.users)
    return Batch(
        users=EncodedUsers(
            np.concatenate([a.users.ids, b.users.ids]),
            {k: np.concatenate([a.users.features[k], b.users.features[k]]) for k in a.users.features},
            np.concatenate([a.users.history, b.users.history]),
        ),
        positives=positives,
        owner=np.concatenate([a.owner, b.owner + rows_a]),
        columns=columns,
        column_items=EncodedItems(data.items.ids[columns], {k: v[columns] for k, v in data.items.features.items()}),
        column=np.searchsorted(columns, positives),
        negative_column=None,
        pool=np.concatenate([a.pool, b.pool]),
        owned=np.concatenate([a.owned, b.owned]),
        owned_row=np.concatenate([a.owned_row, b.owned_row + rows_a]),
        examples=a.examples + b.examples,
    )


def _gradients(model: TwoTower) -> dict[str, np.ndarray]:
    return {
        name: (p.grad.to_dense() if p.grad.is_sparse else p.grad).numpy().copy()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def _rank_gradients(rank: int, port: int, out: str, loss: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    distributed.start(torch.device("cpu"))
    try:
        config = CONFIGS[loss]
        dataset, data, halves = _setup(config)
        model = _model(dataset, data, config)
        for name in ("user_tower.history", "item_tower.item_id"):
            dict(model.named_modules())[name].sparse = True
        step = torch.nn.parallel.DistributedDataParallel(StepLoss(model, config, data.item_counts))
        step(halves[rank]).backward()
        np.savez(f"{out}-{rank}.npz", **_gradients(model))
        del step  # the DDP wrapper goes before its process group
        distributed.barrier()
    finally:
        distributed.stop()
    # The gradients are written and checked by the parent. Leave without the interpreter's teardown: in full-suite
    # runs gloo's threads sometimes abort a spawned rank there ("terminate called without an active exception"),
    # after its work is done, which is not what this test checks.
    os._exit(0)


@pytest.mark.parametrize("loss", sorted(CONFIGS))
def test_gathered_columns_give_the_gradients_of_one_process_holding_both_halves(tmp_path: Path, loss: str) -> None:
    config = CONFIGS[loss]
    dataset, data, (a, b) = _setup(config)
    assert set(a.columns.tolist()) & set(b.columns.tolist()), "the halves share items: duplicates must be handled"
    model = _model(dataset, data, config)
    # Both halves drew their own uniform negatives: the one process holding them all has twice the draws.
    both = replace(config, uniform_negatives=2 * config.uniform_negatives)
    StepLoss(model, both, data.item_counts)(_merged(data, a, b)).backward()
    expected = _gradients(model)

    mp.spawn(_rank_gradients, args=(free_port(), str(tmp_path / "grads"), loss), nprocs=2, join=True)
    for rank in (0, 1):
        got = dict(np.load(tmp_path / f"grads-{rank}.npz"))
        assert got.keys() == expected.keys()
        for name, gradient in expected.items():  # DDP averaged: every rank holds the full batch's gradient
            np.testing.assert_allclose(got[name], gradient, rtol=1e-4, atol=1e-6, err_msg=name)


def _train(tmp_path: Path, *flags: str) -> dict:
    argv = ["train", "-q", "--artifacts", str(tmp_path), "--synthetic-users", "500", "--synthetic-items", "200"]
    argv += ["--epochs", "12", "--batch-size", "512", "--eval-every", "3", "--refit", "never", "--dim", "16", *flags]
    done = subprocess.run(
        [sys.executable, "-m", "training", *argv], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [version] = ArtifactStore(tmp_path).model_versions()  # written once, by rank 0
    return load_model(ArtifactStore(tmp_path).model_dir(version)).manifest["metrics"]


@pytest.mark.slow
def test_two_processes_train_one_artifact_as_good_as_one_process(tmp_path: Path) -> None:
    one = _train(tmp_path / "one")
    two = _train(tmp_path / "two", "--nproc", "2")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["test"]["ndcg@10"] > two["test_popularity"]["ndcg@10"] + 0.05
    assert abs(two["test"]["ndcg@10"] - one["test"]["ndcg@10"]) < 0.05, (one["test"], two["test"])
    assert not list((tmp_path / "two").glob("checkpoints/*/state.pt"))  # a finished run leaves no checkpoint


def test_one_process_is_not_distributed() -> None:
    assert not distributed.launched() and distributed.world() == 1 and distributed.is_main()
    x = torch.ones(3, 2)
    assert distributed.gather_rows(x) is x
    codes, sizes = distributed.gather_array(np.array([3, 1]))
    assert codes.tolist() == [3, 1] and sizes.tolist() == [2]
    assert distributed.broadcast("go") == "go"
    assert distributed.sum_array(np.array([1.5])).tolist() == [1.5]
