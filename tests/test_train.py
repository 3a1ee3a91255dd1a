"""The training loop: it beats popularity on planted data, is deterministic for a seed, never shows an example its
own target, carries cold users by their history, and refits on every training row when asked."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers import TINY_CONFIG
from training.artifacts import LoadedModel
from training.config import TrainConfig
from training.dataset import Dataset, split_random, synthetic
from training.features import encode_item_frame, encode_users
from training.model import TwoTower, embed_items, embed_users
from training.train import Trainer, TrainingData, fit


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
    config = TrainConfig(**{**TINY_CONFIG.__dict__, "epochs": 2, "loss": loss})
    first, second = (fit(tiny_dataset, train, config, progress=False).model.state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("history_keep", [0.5, 0.95])  # at 0.95 many users draw no target and get one back
def test_batch_history_never_contains_its_targets(tiny_dataset: Dataset, history_keep: float) -> None:
    data = TrainingData(tiny_dataset, tiny_dataset.interactions)
    config = TrainConfig(history_keep=history_keep, id_dropout=0.0)
    trainer = Trainer(TwoTower(tiny_dataset.spec, data.vocabs), data, config)
    batch = trainer.batch(np.arange(len(data)))
    targets = data.items.ids[batch.positives]  # (T,) vocabulary ids
    assert not (batch.users.history[batch.owner] == targets[:, None]).any()
    # Every user has targets, and history plus targets are exactly the user's items.
    assert set(batch.owner.tolist()) == set(range(len(data)))
    for row in (0, 1, len(data) - 1):
        shown = set(batch.users.history[row][batch.users.history[row] != 0].tolist())
        hidden = set(targets[batch.owner == row].tolist())
        assert shown | hidden == set(data.items.ids[data.items_of(row)].tolist())


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
    only_in_validation = set(val_rows.item_id) - set(fit_rows.item_id)
    assert only_in_validation
    plain = fit(sparse, train, config, progress=False)
    refit = fit(sparse, train, replace(config, refit=True), progress=False)
    assert refit.best_epoch == plain.best_epoch  # the same fit chose the epoch count
    # vocabularies of the fit rows only, then of every training row (the validation slice's items included)
    assert not only_in_validation & set(plain.model.vocabs.item_ids.tokens)
    assert set(refit.model.vocabs.item_ids.tokens) == set(train.item_id)
