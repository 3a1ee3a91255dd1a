"""The training loop: vocabularies from the training split, examples without target leakage, early stopping
on a validation slice carved from the training rows, curves, and the model artifact.

Read top to bottom: `TrainingData` (the fit rows encoded once) -> `Trainer` (batches and the loss step) ->
`fit` (epochs, early stopping, refit) -> `train_and_save` (the `twotower train` entry point: split, fit,
evaluate, write the artifact). The recipe is `training.config.TrainConfig`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from training.artifacts import ArtifactStore, save_model, write_json
from training.config import TrainConfig
from training.dataset import Dataset, histories, split_random, users_table
from training.evaluate import Protocol, encode_protocol_users, evaluate
from training.features import EncodedItems, EncodedUsers, build_vocabularies, encode_item_frame, encode_user_frame
from training.losses import NegativeSampler, bpr_loss, softmax_loss, triplet_loss
from training.model import TwoTower, embed_items, embed_users
from training.plots import plot_curves

log = logging.getLogger(__name__)


class TrainingData:
    """The fit rows prepared once: vocabularies, the encoded catalog, and each user's items and raw features."""

    def __init__(self, dataset: Dataset, fit: pd.DataFrame) -> None:
        spec = dataset.spec
        fit_users = sorted(set(fit.user_id))
        fit_items = sorted(set(fit.item_id))
        user_rows = dataset.users.reindex(fit_users)
        item_rows = dataset.items.reindex(fit_items)
        self.user_features = {f.name: user_rows[f.name].tolist() for f in spec.user_features if f.name in user_rows}
        # Vocabularies from the training split only: no popularity or id leaks from held-out rows.
        self.vocabs = build_vocabularies(
            spec,
            fit_users,
            fit_items,
            self.user_features,
            {f.name: item_rows[f.name].tolist() for f in spec.item_features if f.name in item_rows},
        )
        self.catalog_ids = np.array(dataset.items.index, dtype=object)
        self.items = encode_item_frame(spec, self.vocabs, dataset.items)
        self.user_ids = fit_users
        item_pos = {item: i for i, item in enumerate(self.catalog_ids)}
        hist = histories(fit)
        # Catalog positions of each user's items, newest first (the order histories are kept in), all users' lists
        # end to end: user u's are flat_items[starts[u]:starts[u + 1]] (batches are cut from them vectorised).
        lengths = np.array([len(hist[u]) for u in fit_users], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.flat_items = np.array([item_pos[i] for u in fit_users for i in hist[u]], dtype=np.int64)
        self.item_counts = np.bincount(fit.item_id.map(item_pos), minlength=len(self.catalog_ids)).astype(np.float64)
        # Ids and features encoded once (histories are drawn per batch): (users,) and (users, width) arrays.
        self.users = encode_user_frame(spec, self.vocabs, user_rows, [[] for _ in fit_users])
        # (users, catalog) sparse: does user u have item i among its training items (accidental-hit masks).
        self.owned = sp.csr_matrix(
            (np.ones(len(self.flat_items), dtype=bool), self.flat_items, self.starts),
            shape=(len(fit_users), len(self.catalog_ids)),
        )

    def __len__(self) -> int:
        return len(self.user_ids)

    def items_of(self, user: int) -> np.ndarray:
        """User row `user`'s catalog positions, newest first."""
        return self.flat_items[self.starts[user] : self.starts[user + 1]]


@dataclass
class Batch:
    """One training batch: U users, and T positives each owned by one of them."""

    users: EncodedUsers  # U users, histories without their targets
    positives: np.ndarray  # (T,) catalog positions
    owner: np.ndarray  # (T,) row in `users` whose positive each one is


class Trainer:
    """Builds leak-free batches and applies the configured loss.

    A batch is a set of users. Each user's items are split at random: a `history_keep` fraction becomes the
    history the user tower sees, the rest are that user's positives. So no example's history contains its own
    target (DESIGN §6), the model learns to predict items from the user's other items exactly as it must at
    serving time, and one user-tower forward serves all of the user's positives in the batch."""

    def __init__(self, model: TwoTower, data: TrainingData, config: TrainConfig) -> None:
        self.model, self.data, self.config = model, data, config
        self.rng = np.random.default_rng(config.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        counts = data.item_counts
        self.p_item = np.maximum(counts, 1.0) / counts.sum()  # training frequency (unseen items count as 1)
        self.sampler = NegativeSampler(counts, config.negatives, seed=config.seed)
        self.uniform = NegativeSampler(counts, "uniform", seed=config.seed + 1)
        self.uniform_p = self.uniform.probs.numpy()
        self.max_history = model.spec.max_history

    def batch(self, users: np.ndarray) -> Batch:
        config, data = self.config, self.data
        # The batch users' items end to end, with the batch row each belongs to; rows stay in order.
        lengths = data.starts[users + 1] - data.starts[users]
        row_of = np.repeat(np.arange(len(users)), lengths)
        first = np.cumsum(lengths) - lengths  # where each row's items begin
        items = data.flat_items[np.repeat(data.starts[users] - first, lengths) + np.arange(lengths.sum())]
        keep = self.rng.random(len(items)) < config.history_keep
        for row in np.flatnonzero(np.bincount(row_of, keep, len(users)) == lengths):
            keep[first[row] + self.rng.integers(lengths[row])] = False  # every user keeps at least one positive
        # History: the first `max_history` kept items of each row, in order (newest first).
        kept = np.flatnonzero(keep)
        rank = np.arange(len(kept)) - np.searchsorted(row_of[kept], row_of[kept])
        shown = kept[rank < self.max_history]
        history = np.zeros((len(users), self.max_history), dtype=np.int64)
        history[row_of[shown], rank[rank < self.max_history]] = data.items.ids[items[shown]]
        # Ids are dropped to "unknown" at random so the unknown embedding learns what a cold user looks like.
        ids = np.where(self.rng.random(len(users)) >= config.id_dropout, data.users.ids[users], 0)
        features = {
            k: np.where(self.rng.random((len(users), 1)) >= config.feature_dropout, v[users], 0)
            for k, v in data.users.features.items()
        }
        encoded = EncodedUsers(ids, features, history)
        return Batch(encoded, items[~keep], row_of[~keep])

    def item_batch(self, positions: np.ndarray) -> EncodedItems:
        items = self.data.items
        ids = np.where(self.rng.random(len(positions)) >= self.config.id_dropout, items.ids[positions], 0)
        return EncodedItems(ids, {k: v[positions] for k, v in items.features.items()})

    def step(self, user_rows: np.ndarray) -> float:
        config, model = self.config, self.model
        batch = self.batch(user_rows)
        users = model.users(batch.users)  # (U, D)
        owner = torch.from_numpy(batch.owner)
        if config.loss == "softmax":
            # Columns: the batch's distinct positives, plus `uniform_negatives` items drawn uniformly from the items
            # seen in training
            # (mixed negative sampling, Yang et al. 2020), each through the item tower once.
            drawn = (
                self.uniform.sample(config.uniform_negatives).numpy()
                if config.uniform_negatives
                else np.zeros(0, np.int64)
            )
            columns, inverse = np.unique(np.concatenate([batch.positives, drawn]), return_inverse=True)
            items = model.items(self.item_batch(columns))  # (C, D)
            column = torch.from_numpy(inverse[: len(batch.positives)].astype(np.int64))
            # Accidental hits: a column whose item is one of the row's own items (history or positives).
            accidental = torch.from_numpy(self.data.owned[user_rows][:, columns].toarray())
            log_q = self._log_q(columns, len(batch.positives), config.uniform_negatives) if config.logq else None
            loss = softmax_loss(users, items, owner, log_q, config.temperature, accidental, column)
        else:
            negatives = self.sampler.sample(len(owner)).numpy()
            columns, inverse = np.unique(np.concatenate([batch.positives, negatives]), return_inverse=True)
            vectors = model.items(self.item_batch(columns))  # (C, D)
            # index_select, not v[idx] nor slices of one gather: their backward passes add rows up much slower
            rows = torch.from_numpy(inverse.astype(np.int64))
            positive = torch.index_select(vectors, 0, rows[: len(owner)])  # (T, D)
            negative = torch.index_select(vectors, 0, rows[len(owner) :])  # (T, D)
            owner_vectors = torch.index_select(users, 0, owner)  # (T, D)
            if config.loss == "bpr":
                loss = bpr_loss(owner_vectors, positive, negative)
            else:
                loss = triplet_loss(owner_vectors, positive, negative, config.margin)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def epoch(self, on_step: Callable[[], object] | None = None) -> list[float]:
        """One pass over the users in a random order, `batch_size` users per step; returns the step losses."""
        model, size = self.model, self.config.batch_size
        model.train()
        order = self.rng.permutation(len(self.data))
        losses = []
        for start in range(0, len(order), size):
            losses.append(self.step(order[start : start + size]))
            if on_step is not None:
                on_step()
        return losses

    def _log_q(self, columns: np.ndarray, positives: int, uniform: int) -> torch.Tensor:
        """log P(item is among the columns): the batch's positives are `positives` draws in proportion to training
        frequency and `uniform` more are uniform over the N items seen in training; columns are distinct items, so
        the chance of being a column is 1 - P(never drawn) = 1 - (1 - p)^positives (1 - 1/N)^uniform."""
        never = positives * np.log1p(-self.p_item[columns]) + uniform * np.log1p(-self.uniform_p[columns])
        return torch.from_numpy(np.log(-np.expm1(never)).astype(np.float32))


@dataclass
class FitResult:
    model: TwoTower
    curves: list[dict[str, float]]
    best_epoch: int
    seconds: float


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # third-party code may use the global generator


def fit(dataset: Dataset, train: pd.DataFrame, config: TrainConfig, progress: bool = True) -> FitResult:
    """Train on `train` minus a validation slice; keep the epoch with the best validation NDCG@10."""
    set_seed(config.seed)
    started = time.perf_counter()
    fit_rows, val_rows = split_random(train, config.val_fraction, seed=config.seed + 10_000)
    data = TrainingData(dataset, fit_rows)
    model = TwoTower(dataset.spec, data.vocabs, config.tower)
    trainer = Trainer(model, data, config)
    validation = Protocol(list(data.catalog_ids), fit_rows, val_rows)
    val_users = encode_protocol_users(data.vocabs, dataset, validation.users, fit_rows)

    curves: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Any]] = (-math.inf, -1, {})
    steps = math.ceil(len(data) / config.batch_size)
    bar = tqdm(total=config.epochs * steps, desc=f"train {config.loss}", unit="step", disable=not progress)
    losses: list[float] = []
    for epoch in range(config.epochs):
        losses += trainer.epoch(on_step=lambda: bar.update(1))
        if (epoch + 1) % config.eval_every and epoch + 1 != config.epochs:
            continue
        val = validation.score(embed_users(model, val_users), embed_items(model, data.items))
        curves.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "val_ndcg@10": val.ndcg,
                "seconds": time.perf_counter() - started,
            }
        )
        losses = []
        bar.set_postfix(loss=f"{curves[-1]['loss']:.4f}", val_ndcg=f"{val.ndcg:.4f}")
        if val.ndcg > best[0]:
            best = (val.ndcg, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= config.patience * config.eval_every:
            log.info("early stop at epoch %d: best val NDCG@10 %.4f at epoch %d", epoch + 1, best[0], best[1] + 1)
            break
        if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
            log.warning("stopping at epoch %d: max_seconds=%s reached", epoch + 1, config.max_seconds)
            break
    bar.close()
    model.load_state_dict(best[2])
    if config.refit:
        model = _refit(dataset, train, config, best[1] + 1, progress)
    model.eval()
    return FitResult(model, curves, best[1] + 1, time.perf_counter() - started)


def _refit(dataset: Dataset, train: pd.DataFrame, config: TrainConfig, epochs: int, progress: bool) -> TwoTower:
    """A fresh model trained on every training row for `epochs` epochs (no validation left to stop on)."""
    set_seed(config.seed)
    data = TrainingData(dataset, train)
    model = TwoTower(dataset.spec, data.vocabs, config.tower)
    trainer = Trainer(model, data, config)
    for _ in tqdm(range(epochs), desc=f"refit {config.loss}", unit="epoch", disable=not progress):
        trainer.epoch()
    return model


def train_and_save(
    dataset: Dataset, store: ArtifactStore, config: TrainConfig, holdout: float = 0.2, progress: bool = True
) -> Path:
    """Split off `holdout` of the rows as a test set (DESIGN §4), fit on the rest, evaluate on the test set
    beside the popularity baseline, and publish the model artifact. With holdout=0 every row trains."""
    started = time.perf_counter()
    if holdout > 0:
        train, test = split_random(dataset.interactions, holdout, seed=config.seed)
    else:
        train, test = dataset.interactions, dataset.interactions.iloc[:0]
    result = fit(dataset, train, config, progress=progress)
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "fit_seconds": round(result.seconds, 2),
        "best_val_ndcg@10": max(c["val_ndcg@10"] for c in result.curves),
    }
    if len(test):
        metrics["test"] = evaluate(result.model, dataset, train, test).as_dict()
        metrics["test_popularity"] = Protocol(list(dataset.items.index), train, test).popularity(train).as_dict()
    catalog = encode_item_frame(dataset.spec, result.model.vocabs, dataset.items)
    model_dir = save_model(
        store,
        result.model,
        catalog=dataset.items,
        users=users_table(dataset, train),
        item_embeddings=embed_items(result.model, catalog, progress=progress),
        training={
            **config.to_dict(),
            "dataset": dataset.name,
            "holdout": holdout,
            "interactions": len(dataset.interactions),
            "train_rows": len(train),
        },
        metrics=metrics,
        extra_files={
            "metrics.json": lambda p: write_json(p, {**metrics, "curves": result.curves}),
            "curves.png": lambda p: plot_curves(result.curves, p, f"{dataset.name} · {config.loss}"),
        },
    )
    log.info("model %s written in %.1f s: %s", model_dir.name, time.perf_counter() - started, metrics)
    return model_dir
