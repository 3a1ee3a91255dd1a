"""The training loop: it beats popularity on planted data, is deterministic for a seed, never shows an example its
own target, carries cold users by their history, and refits on every training row when asked."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY_CONFIG
from training.artifacts import ArtifactStore, LoadedModel
from training.config import TrainConfig
from training.dataset import Dataset, interactions_from_codes, split_random, synthetic
from training.features import encode_item_frame, encode_users
from training.model import TwoTower, embed_items, embed_users
from training.train import Batches, StepLoss, TrainingData, fit


def test_model_beats_popularity_on_planted_data_by_a_clear_margin(trained_model: LoadedModel) -> None:
    metrics = trained_model.manifest["metrics"]
    model_ndcg, popularity_ndcg = metrics["test"]["ndcg@10"], metrics["test_popularity"]["ndcg@10"]
    assert model_ndcg > popularity_ndcg + 0.1, (model_ndcg, popularity_ndcg)


def test_training_writes_curves_plot_beside_metrics(trained_model: LoadedModel) -> None:
    metrics = json.loads((trained_model.directory / "metrics.json").read_text())
    assert len(metrics["curves"]) >= 1 and {"loss", "val_ndcg@10"} <= metrics["curves"][0].keys()
    assert (trained_model.directory / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("loss", ["softmax", "bpr", "triplet"])
def test_training_is_deterministic_given_a_seed(tiny_dataset: Dataset, loss: str) -> None:
    train, _ = split_random(tiny_dataset.interactions, 0.2, seed=1)
    config = replace(TINY_CONFIG, epochs=2, loss=loss)
    first, second = (fit(tiny_dataset, train, config, progress=False).model.state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("history_keep", [0.5, 0.95])  # at 0.95 many users draw no target and get one back
def test_batch_history_never_contains_its_targets(tiny_dataset: Dataset, history_keep: float) -> None:
    data = TrainingData(tiny_dataset, tiny_dataset.interactions)
    config = TrainConfig(history_keep=history_keep, id_dropout=0.0)
    batch = Batches(data, config, tiny_dataset.spec.max_history, world=1).make(0, 0, np.arange(len(data)))
    targets = data.items.ids[batch.positives]  # (T,) vocabulary ids
    assert not (batch.users.history[batch.owner] == targets[:, None]).any()
    # Every user has targets, and history plus targets are exactly the user's items.
    assert set(batch.owner.tolist()) == set(range(len(data)))
    for row in (0, 1, len(data) - 1):
        shown = set(batch.users.history[row][batch.users.history[row] != 0].tolist())
        hidden = set(targets[batch.owner == row].tolist())
        assert shown | hidden == set(data.items.ids[data.items_of(row)].tolist())
    assert batch.examples == len(data.flat_items)


def test_steps_are_bounded_by_examples_and_a_heavy_user_by_its_cap() -> None:
    rows = synthetic(n_users=60, n_items=400, n_clusters=4, interactions_per_user=8, seed=2).interactions
    heavy = np.full(300, rows.user[0])  # one user with far more items than the others
    dataset = synthetic(n_users=60, n_items=400, n_clusters=4, interactions_per_user=8, seed=2)
    user = np.concatenate([rows.user, heavy])
    item = np.concatenate([rows.item, np.arange(300, dtype=np.int32)])
    dataset.interactions = interactions_from_codes(user, item, rows.user_ids, rows.item_ids)
    data = TrainingData(dataset, dataset.interactions)
    config = TrainConfig(batch_size=64, max_user_items=50)
    batches = Batches(data, config, dataset.spec.max_history, world=1)
    steps = batches.step_users(0)
    assert len(steps) == batches.steps_per_epoch > 1
    assert sorted(np.concatenate(steps).tolist()) == list(range(len(data)))  # every user once per epoch
    made = [batches.make(0, s, users) for s, users in enumerate(steps)]
    assert max(b.examples for b in made) <= config.batch_size + config.max_user_items
    heavy_row = int(np.argmax(data.lengths))
    assert data.lengths[heavy_row] > config.max_user_items
    (step,) = [s for s, users in enumerate(steps) if heavy_row in users]
    row = int(np.flatnonzero(steps[step] == heavy_row)[0])
    drawn = made[step]
    shown = np.count_nonzero(drawn.users.history[row]) + np.count_nonzero(drawn.owner == row)
    assert shown == config.max_user_items  # a random subset of the heavy user's items, not all of them
    # The same (epoch, step) gives the same batch: a resumed run draws what the killed one would have.
    again = batches.make(0, step, steps[step])
    np.testing.assert_array_equal(again.users.history, drawn.users.history)
    np.testing.assert_array_equal(again.positives, drawn.positives)


def test_the_triplet_mines_its_hard_negatives_only_from_the_uniform_pool() -> None:
    dataset = synthetic(n_users=60, n_items=400, n_clusters=4, interactions_per_user=8, seed=2)
    data = TrainingData(dataset, dataset.interactions)
    config = TrainConfig(loss="triplet", batch_size=64, negative_pool=32)
    batches = Batches(data, config, dataset.spec.max_history, world=1)
    batch = batches.make(0, 0, batches.step_users(0)[0])
    assert len(batch.pool) == 32 and set(batch.pool) <= set(batch.columns.tolist())
    step = StepLoss(TwoTower(dataset.spec, data.vocabs, config.tower), config, data.item_counts)
    items = torch.zeros(len(batch.columns), config.tower.dim)
    columns = step._columns(batch, items, len(batch.positives))
    assert columns.pool is not None and columns.log_q is None  # logQ corrects the softmax only
    np.testing.assert_array_equal(columns.pool.numpy(), np.isin(batch.columns, batch.pool))
    assert not columns.pool.all()  # the batch's positives outside the pool are not mined
    unpooled = Batches(data, replace(config, negative_pool=0), dataset.spec.max_history, world=1)
    assert len(unpooled.make(0, 0, unpooled.step_users(0)[0]).pool) == 0


def test_unknown_user_with_a_cluster_history_gets_that_clusters_items(
    trained_model: LoadedModel, tiny_dataset: Dataset
) -> None:
    model = trained_model.model
    cluster = np.array([genres[0] for genres in tiny_dataset.items.genres])  # planted: first genre = cluster
    item_vectors = embed_items(model, encode_item_frame(tiny_dataset.spec, model.vocabs, tiny_dataset.items))
    clusters = sorted(set(cluster))
    histories = [list(tiny_dataset.items.index[cluster == c][:8]) for c in clusters]
    users = encode_users(model.spec, model.vocabs, ["never-seen"] * len(clusters), {}, histories)
    top = np.argsort(-(embed_users(model, users) @ item_vectors.T), axis=1)[:, :10]  # (C, 10)
    in_cluster = np.mean([cluster[row] == c for row, c in zip(top, clusters, strict=True)])
    assert in_cluster >= 0.5, in_cluster  # chance is 1/6


def test_refit_retrains_on_every_training_row_for_the_early_stopped_epochs() -> None:
    sparse = synthetic(n_users=150, n_items=1500, n_clusters=5, interactions_per_user=6, seed=1)
    train, _ = split_random(sparse.interactions, 0.2, seed=0)
    config = replace(TINY_CONFIG, epochs=4, eval_every=2)
    fit_rows, val_rows = split_random(train, config.val_fraction, seed=config.seed + 10_000)  # as `fit` splits
    only_in_validation = set(val_rows.item.tolist()) - set(fit_rows.item.tolist())
    assert only_in_validation
    plain = fit(sparse, train, config, progress=False)
    refit = fit(sparse, train, replace(config, refit="always"), progress=False)
    assert refit.best_epoch == plain.best_epoch and refit.refit and not plain.refit
    # vocabularies of the fit rows only, then of every training row (the validation slice's items included)
    validation_ids = set(train.item_ids[sorted(only_in_validation)])
    assert not validation_ids & set(plain.model.vocabs.item_ids.tokens)
    assert set(refit.model.vocabs.item_ids.tokens) == set(train.item_ids[np.unique(train.item)])


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_with_the_same_model(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "training", "train", "-q", "--synthetic-users", "300", "--synthetic-items", "150"]
    argv += ["--epochs", "30", "--batch-size", "256", "--eval-every", "2", "--checkpoint-seconds", "0"]
    argv += ["--refit", "never", "--dim", "8", "--patience", "100"]
    root = Path(__file__).resolve().parents[1]

    def run(artifacts: Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*argv, "--artifacts", str(artifacts)], capture_output=True, text=True, cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run(tmp_path / "whole")
    killed = subprocess.Popen([*argv, "--artifacts", str(tmp_path / "killed")], cwd=root, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("checkpoints/*/state.pt")):
        assert killed.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.01)
    time.sleep(1.0)  # a few more steps: killed between checkpoints, not at one
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "models").exists(), "the run finished before it was killed"
    resumed = run(tmp_path / "killed")
    assert "resuming from" in resumed.stderr
    [whole], [again] = (ArtifactStore(tmp_path / name).model_versions() for name in ("whole", "killed"))
    for name in ("user_tower.safetensors", "item_tower.safetensors", "item_embeddings.npy"):
        first = (ArtifactStore(tmp_path / "whole").model_dir(whole) / name).read_bytes()
        assert first == (ArtifactStore(tmp_path / "killed").model_dir(again) / name).read_bytes(), name
    assert not list((tmp_path / "killed").glob("checkpoints/*/state.pt"))  # done: the checkpoint is gone
