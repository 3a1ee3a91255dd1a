"""The training loop: vocabularies from the training split, examples without target leakage, batches bounded by
examples and prepared off the critical path, early stopping on a validation slice carved from the training rows,
checkpoints a killed run resumes from, curves, and the model artifact. One code path for one process and for
several under torchrun (`training.distributed`).

Read top to bottom: `TrainingData` (the fit rows as arrays, once) -> `Batches` (each step's examples, a pure
function of (seed, epoch, step)) -> `StepLoss` (the towers and the loss as one module: what DDP wraps) ->
`Trainer` (optimizers, steps, epochs, checkpoints) -> `fit` (epochs, validation, early stopping, refit) ->
`train_and_save` (the `twotower train` entry point: split, fit, evaluate, write the artifact).

Scale rules:
- a step holds whole users until it has `batch_size` examples; a user contributes at most `max_user_items` of
  its items to one step (a fresh random subset of a heavier user's each epoch), so one user never decides a
  step's size;
- id and history embedding tables get sparse gradients and SparseAdam (`optimizer="sparse"`), so a step costs
  the rows it touches, not the whole tables;
- accidental hits are (row, column) pairs found by a sorted search, never a users x catalog matrix;
- validation scores a bounded, seeded sample of users (`val_users`);
- under torchrun each rank trains its own shard of users, the softmax columns are gathered across ranks (N
  ranks: N times the negatives), logQ uses the global item counts, and rank 0 validates and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training import distributed
from training.artifacts import ArtifactStore, LoadedModel, save_model, write_json
from training.config import TrainConfig
from training.dataset import Dataset, Interactions, split_random, users_table
from training.evaluate import Protocol, RankingMetrics, evaluate
from training.features import EncodedItems, EncodedUsers, build_vocabularies, encode_item_frame, encode_user_frame
from training.losses import NegativeSampler, bpr_loss, hard_triplet_loss, softmax_loss, triplet_loss
from training.model import TwoTower, embed_items, embed_users
from training.plots import plot_curves, plot_trials
from training.warm_start import WarmStart, warm_start

log = logging.getLogger(__name__)

# `refit="auto"` refits when the training rows are at most this many. Below it a second training costs little
# and the validation slice's rows (and the items only they hold) are worth having in the model; above it the
# slice is a small share of plenty and a second run doubles a long one (docs/loss.md measures the gain).
REFIT_MAX_ROWS = 1_000_000
# `eval_every=0` validates about this often, in examples drawn, and at least once per epoch.
EVAL_EXAMPLES = 500_000
# Batches prepared ahead of the one being trained on.
PREFETCH = 3
# The validation slice is carved from the training rows with this offset to the split seed.
VALIDATION_SEED_OFFSET = 10_000


def choose_device(name: str) -> torch.device:
    """`auto`: the GPU when one is present (this rank's, under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- the fit rows, once


class TrainingData:
    """The fit rows prepared once: vocabularies, the encoded catalog and users, and each user's items.

    Users are the rows here (in user-code order, which is id order); `items_of(row)` are catalog positions, newest
    first. Under torchrun `shard` keeps this rank's users for batches, while vocabularies and item counts are of
    all fit rows, the same on every rank."""

    def __init__(self, dataset: Dataset, fit: Interactions, shard: tuple[int, int] = (0, 1)) -> None:
        spec = dataset.spec
        grouped = fit.by_user()
        counts = fit.item_counts()
        fit_items = np.flatnonzero(counts)
        user_ids = fit.user_ids[grouped.users]
        users = dataset.users.reindex(pd.Index(user_ids, dtype=object))
        items = dataset.items.iloc[fit_items]
        # Vocabularies from the training split only: no popularity or id leaks from held-out rows.
        self.vocabs = build_vocabularies(
            spec,
            user_ids,
            fit.item_ids[fit_items],
            {f.name: users[f.name].tolist() for f in spec.user_features if f.name in users},
            {f.name: items[f.name].tolist() for f in spec.item_features if f.name in items},
        )
        self.catalog_ids = dataset.items.index.to_numpy(dtype=object)
        self.items = encode_item_frame(spec, self.vocabs, dataset.items)  # (I,): the catalog
        # Ids and features encoded once (histories are drawn per batch): (U,) and (U, width) arrays.
        self.users = encode_user_frame(spec, self.vocabs, users, [[] for _ in range(len(user_ids))])
        self.starts = grouped.indptr  # user row u's items are flat_items[starts[u]:starts[u + 1]]
        self.flat_items = grouped.items.astype(np.int64)
        self.item_counts = counts.astype(np.float64)  # of all fit rows, on every rank
        rank, world = shard
        self.rows = np.arange(rank, len(user_ids), world)  # the user rows this process trains on

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def items_of(self, user: int) -> np.ndarray:
        """User row `user`'s catalog positions, newest first."""
        return self.flat_items[self.starts[user] : self.starts[user + 1]]


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One step's examples: U users (histories without their targets), T positives each owned by one of them,
    and the C item columns the step scores against (the distinct positives, and sampled negatives)."""

    users: EncodedUsers  # (U,)
    positives: np.ndarray  # (T,) catalog positions
    owner: np.ndarray  # (T,) row in `users` whose positive each one is
    columns: np.ndarray  # (C,) catalog positions, ascending
    column_items: EncodedItems  # (C,) the columns, encoded (ids dropped to unknown at random)
    column: np.ndarray  # (T,) index of each positive in `columns`
    negative_column: np.ndarray | None  # (T,) bpr/triplet: the index of each positive's negative in `columns`
    pool: np.ndarray  # (P,) catalog positions the triplet mines its hard negatives from (`negative_pool`)
    owned: np.ndarray  # (M,) catalog positions of all of the U users' training items ...
    owned_row: np.ndarray  # (M,) ... and the row each belongs to (accidental hits)
    examples: int  # items drawn into the step (history and positives)


class Batches:
    """Each step's `Batch`, a pure function of (seed, epoch, step): nothing to carry from one step to the next,
    so batches can be prepared ahead in another thread and a resumed run draws exactly the batches the killed
    one would have.

    An epoch visits this process's users in a random order, cut into `steps(epoch)` steps of about `batch_size`
    examples. Each user's items (at most `max_user_items`, a random subset of more) are split at random: a
    `history_keep` fraction becomes the history the user tower sees, the rest are that user's positives. So no
    example's history contains its own target (DESIGN §6), the model learns to predict items from the user's other
    items exactly as it must at serving time, and one user-tower forward serves all of the user's positives."""

    def __init__(self, data: TrainingData, config: TrainConfig, max_history: int, world: int) -> None:
        self.data, self.config, self.max_history = data, config, max_history
        counts = data.item_counts
        self.sampler = NegativeSampler(counts, config.negatives)
        self.uniform = NegativeSampler(counts, "uniform")
        self.pool_per_process = math.ceil(config.negative_pool / world)
        capped = np.minimum(data.lengths, config.max_user_items)
        self.examples_per_epoch = int(capped[data.rows].sum())
        # The same number of steps on every rank (each step is a collective), from the total over all users.
        total = int(capped.sum())
        self.steps_per_epoch = max(1, math.ceil(total / (config.batch_size * world)))

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *key])

    def step_users(self, epoch: int) -> list[np.ndarray]:
        """This process's user rows of each step of `epoch`: a seeded permutation cut where the running count of
        examples crosses each step's share."""
        rows = self.data.rows[self._rng(0, epoch).permutation(len(self.data.rows))]
        sizes = np.minimum(self.data.lengths[rows], self.config.max_user_items)
        ends = np.cumsum(sizes)
        cuts = np.searchsorted(ends, np.arange(1, self.steps_per_epoch) * (ends[-1] / self.steps_per_epoch))
        return np.split(rows, cuts) if len(rows) else [rows] * self.steps_per_epoch

    def make(self, epoch: int, step: int, users: np.ndarray) -> Batch:
        config, data = self.config, self.data
        rng = self._rng(1, epoch, step)
        lengths = data.lengths[users]
        # The users' items end to end, with the batch row each belongs to; rows stay in order.
        owned_row = np.repeat(np.arange(len(users)), lengths)
        first = np.cumsum(lengths) - lengths  # where each row's items begin
        owned = data.flat_items[np.repeat(data.starts[users] - first, lengths) + np.arange(lengths.sum())]
        drawn = np.ones(len(owned), dtype=bool)
        for row in np.flatnonzero(lengths > config.max_user_items):  # heavy users: a random subset, order kept
            drawn[first[row] : first[row] + lengths[row]] = False
            drawn[first[row] + rng.choice(lengths[row], config.max_user_items, replace=False)] = True
        take = np.flatnonzero(drawn)
        items, row_of = owned[take], owned_row[take]
        counts = np.bincount(row_of, minlength=len(users))
        starts = np.cumsum(counts) - counts
        keep = rng.random(len(items)) < config.history_keep
        for row in np.flatnonzero(np.bincount(row_of, keep, len(users)) == counts):
            keep[starts[row] + rng.integers(counts[row])] = False  # every user keeps at least one positive
        # History: the first `max_history` kept items of each row, in order (newest first).
        kept = np.flatnonzero(keep)
        rank = np.arange(len(kept)) - np.searchsorted(row_of[kept], row_of[kept])
        shown = kept[rank < self.max_history]
        history = np.zeros((len(users), self.max_history), dtype=np.int64)
        history[row_of[shown], rank[rank < self.max_history]] = data.items.ids[items[shown]]
        # Ids are dropped to "unknown" at random so the unknown embedding learns what a cold user looks like.
        ids = np.where(rng.random(len(users)) >= config.id_dropout, data.users.ids[users], 0)
        features = {
            k: np.where(rng.random((len(users), 1)) >= config.feature_dropout, v[users], 0)
            for k, v in data.users.features.items()
        }
        positives, owner = items[~keep], row_of[~keep]
        negatives = pool = np.zeros(0, np.int64)
        if in_batch(config):
            # Columns: the batch's distinct positives, plus `uniform_negatives` items drawn uniformly from the items
            # seen in training (mixed negative sampling, Yang et al. 2020), each through the item tower once.
            extra = self.uniform.sample(config.uniform_negatives, rng) if config.uniform_negatives else negatives
            if config.loss == "triplet" and config.negative_pool:
                pool = self.uniform.sample(self.pool_per_process, rng)  # the processes' draws make one pool
                extra = np.concatenate([extra, pool])
        else:
            extra = negatives = self.sampler.sample(len(positives), rng)
        columns, inverse = np.unique(np.concatenate([positives, extra]), return_inverse=True)
        column_ids = np.where(rng.random(len(columns)) >= config.id_dropout, data.items.ids[columns], 0)
        column_items = EncodedItems(column_ids, {k: v[columns] for k, v in data.items.features.items()})
        return Batch(
            users=EncodedUsers(ids, features, history),
            positives=positives,
            owner=owner,
            columns=columns,
            column_items=column_items,
            column=inverse[: len(positives)],
            negative_column=None if in_batch(config) else inverse[len(positives) :],
            pool=pool,
            owned=owned,
            owned_row=owned_row,
            examples=len(items),
        )


class Prefetcher:
    """Prepares the given steps' batches in a background thread, a few ahead; `wait_seconds` is how long the
    trainer waited for them (numpy releases the interpreter lock for the heavy array work)."""

    def __init__(self, batches: Batches, epoch: int, first_step: int, depth: int = PREFETCH) -> None:
        self.steps = batches.step_users(epoch)
        self.first_step = first_step
        self.wait_seconds = 0.0
        self._queue: queue.Queue[tuple[int, Batch] | BaseException | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def produce() -> None:
            try:
                for step in range(first_step, len(self.steps)):
                    batch = batches.make(epoch, step, self.steps[step])
                    while not self._stop.is_set():
                        try:
                            self._queue.put((step, batch), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                self._queue.put(None)
            except BaseException as e:  # handed to the trainer, which raises it
                self._queue.put(e)

        self._thread = threading.Thread(target=produce, name="twotower-batches", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - started
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- the loss of a step


def in_batch(config: TrainConfig) -> bool:
    """Whether the loss scores each row against the batch's columns (softmax, the triplet with hard negatives)
    rather than against one sampled negative per positive."""
    return config.loss == "softmax" or (config.loss == "triplet" and config.hard_negatives > 0)


@dataclass(frozen=True)
class _Columns:
    items: torch.Tensor  # (C_all, D) every process's column vectors
    column: torch.Tensor  # (T,) each local positive's column in `items`
    hits: tuple[torch.Tensor, torch.Tensor]  # (row, column) pairs of accidental hits
    dead: torch.Tensor | None  # (C_all,) copies of an item no row may use
    log_q: torch.Tensor | None  # (C_all,)
    pool: torch.Tensor | None  # (C_all,) bool: the triplet's mining pool, where the recipe draws one


class StepLoss(nn.Module):
    """The towers and the configured loss as one module, whose forward is one step's loss (what DDP wraps: the
    model itself stays loss-free). The loss is the mean over every process's positives, scaled by the number of
    processes, so DDP's average of the gradients is the gradient one process holding the whole batch would get."""

    def __init__(self, model: TwoTower, config: TrainConfig, item_counts: np.ndarray) -> None:
        super().__init__()
        self.model, self.config = model, config
        self.p_item = np.maximum(item_counts, 1.0) / item_counts.sum()  # training frequency (unseen items count 1)
        self.uniform_p = NegativeSampler(item_counts, "uniform").probs

    def forward(self, batch: Batch) -> torch.Tensor:
        config, model = self.config, self.model
        users = model.users(batch.users)  # (U, D)
        items = model.items(batch.column_items)  # (C, D)
        device = users.device
        (positives_total,) = distributed.sum_array(np.array([len(batch.positives)], dtype=np.int64))
        scale = distributed.world() / max(int(positives_total), 1)
        owner = torch.from_numpy(batch.owner).to(device)
        if in_batch(config):
            columns = self._columns(batch, items, int(positives_total))
            if config.loss == "softmax":
                loss = softmax_loss(
                    users,
                    columns.items,
                    owner,
                    columns.log_q,
                    config.temperature,
                    hits=columns.hits,
                    column=columns.column,
                    dead=columns.dead,
                    reduction="sum",
                )
            else:
                loss = hard_triplet_loss(
                    users,
                    columns.items,
                    owner,
                    columns.column,
                    config.margin,
                    config.hard_negatives,
                    hits=columns.hits,
                    dead=columns.dead if columns.pool is None else ~columns.pool,
                    reduction="sum",
                )
            return loss * scale
        assert batch.negative_column is not None
        rows = torch.from_numpy(batch.column).to(device)
        negative_rows = torch.from_numpy(batch.negative_column).to(device)
        # index_select, not v[idx] nor slices of one gather: their backward passes add rows up much slower
        positive = torch.index_select(items, 0, rows)  # (T, D)
        negative = torch.index_select(items, 0, negative_rows)  # (T, D)
        owner_vectors = torch.index_select(users, 0, owner)  # (T, D)
        if config.loss == "bpr":
            loss = bpr_loss(owner_vectors, positive, negative) * len(rows)
        else:
            loss = triplet_loss(owner_vectors, positive, negative, config.margin) * len(rows)
        return loss * scale

    def _columns(self, batch: Batch, items: torch.Tensor, positives_total: int) -> _Columns:
        """Every process's columns, each item once (a later copy of an item is dead), with each positive's column,
        the accidental hits and logQ."""
        config, device = self.config, items.device
        all_items = distributed.gather_rows(items)  # (C_all, D): every process's columns
        codes, _ = distributed.gather_array(batch.columns)
        unique, first = np.unique(codes, return_index=True)
        dead = np.ones(len(codes), dtype=bool)
        dead[first] = False
        column = first[np.searchsorted(unique, batch.columns[batch.column])]
        # Accidental hits: a column whose item is one of the row's training items (history or positives).
        at = np.searchsorted(unique, batch.owned).clip(max=len(unique) - 1)
        hit = unique[at] == batch.owned
        hits = (torch.from_numpy(batch.owned_row[hit]).to(device), torch.from_numpy(first[at[hit]]).to(device))
        log_q = None
        if config.logq and config.loss == "softmax":
            uniform_total = config.uniform_negatives * distributed.world()
            log_q = torch.from_numpy(self._log_q(codes, positives_total, uniform_total)).to(device)
        pool = None
        if config.loss == "triplet" and config.negative_pool:
            # Any process's draw of an item puts its one live column in the pool (copies are dead).
            drawn, _ = distributed.gather_array(batch.pool)
            pool = np.zeros(len(codes), dtype=bool)
            pool[first[np.isin(unique, drawn)]] = True
        return _Columns(
            all_items,
            torch.from_numpy(column).to(device),
            hits,
            torch.from_numpy(dead).to(device) if dead.any() else None,
            log_q,
            torch.from_numpy(pool).to(device) if pool is not None else None,
        )

    def _log_q(self, columns: np.ndarray, positives: int, uniform: int) -> np.ndarray:
        """log P(item is among the columns): the positives are `positives` draws in proportion to training
        frequency and `uniform` more are uniform over the N items seen in training; columns are distinct items, so
        the chance of being a column is 1 - P(never drawn) = 1 - (1 - p)^positives (1 - 1/N)^uniform."""
        never = positives * np.log1p(-self.p_item[columns]) + uniform * np.log1p(-self.uniform_p[columns])
        return np.log(-np.expm1(never)).astype(np.float32)


# --------------------------------------------------------------------------- the trainer


SPARSE_TABLES = ("user_tower.user_id", "user_tower.history", "item_tower.item_id")


class Trainer:
    """Optimizers, steps and epochs over `Batches`; `state()` / `load_state()` make a checkpoint of it."""

    def __init__(self, model: TwoTower, data: TrainingData, config: TrainConfig, device: torch.device) -> None:
        self.model, self.data, self.config, self.device = model, data, config, device
        world = distributed.world()
        # Sparse gradients for the big id tables, unless gradients must be all-reduced by NCCL (dense only).
        sparse = config.optimizer == "sparse" and not (world > 1 and device.type == "cuda")
        modules = dict(model.named_modules())
        sparse_params = []
        for name in SPARSE_TABLES:
            module = modules.get(name)
            if isinstance(module, nn.Embedding | nn.EmbeddingBag):
                module.sparse = sparse
                if sparse:
                    sparse_params.append(module.weight)
        sparse_ids = {id(p) for p in sparse_params}
        dense_params = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Adam(dense_params, lr=config.lr, weight_decay=config.weight_decay)
        ]
        self.sparse_params = sparse_params
        if sparse_params:
            self.optimizers.append(torch.optim.SparseAdam(sparse_params, lr=config.lr))
        self.loss = StepLoss(model, config, data.item_counts)
        self.step_module: nn.Module = self.loss
        if world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.loss, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.batches = Batches(data, config, model.spec.max_history, world)
        self.amp = device.type == "cuda"

    def step(self, batch: Batch) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.step_module(batch)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        if self.config.weight_decay and self.sparse_params:
            # SparseAdam has no weight decay: decay the rows this step touched, decoupled (as AdamW does).
            with torch.no_grad():
                for parameter in self.sparse_params:
                    assert parameter.grad is not None
                    rows = torch.unique(parameter.grad._indices()[0])
                    parameter[rows] *= 1.0 - self.config.lr * self.config.weight_decay
        return float(loss.item())

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """The last checkpoint of one run, at `directory/state.pt` (written atomically; rank 0 writes, every rank
    reads). A run is the same run when its data, recipe and process count are: see `run_key`."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._last = time.monotonic()

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / "state.pt"

    def load(self) -> dict[str, Any] | None:
        path = self.path
        if path is None or not path.is_file():
            return None
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        log.info("resuming from %s: %s epoch %d, step %d", path, state["phase"], state["epoch"], state["step"])
        return state

    def due(self, seconds: float) -> bool:
        return time.monotonic() - self._last >= seconds

    def save(self, state: dict[str, Any]) -> None:
        path = self.path
        self._last = time.monotonic()
        if path is None or not distributed.is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def clear(self) -> None:
        if self.path is not None and distributed.is_main():
            self.path.unlink(missing_ok=True)
            with_parent = self.path.parent
            if with_parent.is_dir() and not any(with_parent.iterdir()):
                with_parent.rmdir()


def run_key(dataset: Dataset, config: TrainConfig, holdout: float, held_out: np.ndarray | None = None) -> str:
    """Identifies a training run for resuming: the data arrays, the recipe, the holdout (or the held-out rows) and
    the process count."""
    digest = hashlib.blake2b(digest_size=12)
    rows = dataset.interactions
    for array in (rows.user, rows.item, rows.timestamp, rows.weight, *(() if held_out is None else (held_out,))):
        digest.update(np.ascontiguousarray(array).data)
    description = {
        "dataset": dataset.name,
        "spec": dataset.spec.to_dict(),
        "shape": [len(rows.user_ids), len(rows.item_ids), len(dataset.users), len(dataset.items)],
        "config": config.to_dict(),
        "holdout": holdout,
        "world": distributed.world(),
    }
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    model: TwoTower
    curves: list[dict[str, float]]
    best_epoch: int
    seconds: float
    refit: bool = False
    stats: dict[str, float] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # third-party code may use the global generator


def _eval_every(config: TrainConfig, examples_per_epoch: int) -> int:
    if config.eval_every > 0:
        return config.eval_every
    return max(1, round(EVAL_EXAMPLES / max(examples_per_epoch, 1)))


def _wants_refit(config: TrainConfig, train_rows: int) -> bool:
    return config.refit == "always" or (config.refit == "auto" and train_rows <= REFIT_MAX_ROWS)


def _new_model(
    dataset: Dataset, data: TrainingData, config: TrainConfig, device: torch.device, warm_from: LoadedModel | None
) -> tuple[TwoTower, WarmStart | None]:
    """A freshly initialised model, or with `warm_from` one that starts from that model's weights where they
    carry over (`training.warm_start`)."""
    set_seed(config.seed)
    model = TwoTower(dataset.spec, data.vocabs, config.tower)
    warmed = warm_start(model, warm_from.model, warm_from.version) if warm_from is not None else None
    return model.to(device), warmed


def fit(
    dataset: Dataset,
    train: Interactions,
    config: TrainConfig,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    on_validation: Callable[[int, RankingMetrics], None] | None = None,
    warm_from: LoadedModel | None = None,
) -> FitResult:
    """Train on `train` minus a validation slice; keep the epoch with the best validation NDCG@10; refit on every
    training row when `config.refit` asks for it. Resumes from `checkpoint_dir` when it holds this run's checkpoint.
    `on_validation(epoch, metrics)` hears of every validation pass (a tuner prunes a weak trial by raising from it).
    `warm_from` starts the model (and a refit's) from a previous model's weights for the ids and layers it shares.
    Under torchrun every rank calls it; rank 0 validates and decides, and its result is the one to use."""
    started = time.perf_counter()
    device = choose_device(config.device)
    distributed.start(device)
    checkpoints = Checkpoints(checkpoint_dir)
    resumed = checkpoints.load()
    shard = (distributed.rank(), distributed.world())
    fit_rows, val_rows = split_random(train, config.val_fraction, seed=config.seed + VALIDATION_SEED_OFFSET)
    data = TrainingData(dataset, fit_rows, shard)
    model, warmed = _new_model(dataset, data, config, device, warm_from)
    trainer = Trainer(model, data, config, device)
    validation = Protocol(fit_rows, val_rows, config.val_users, seed=config.seed) if distributed.is_main() else None
    val_users = validation.encode_users(dataset, data.vocabs, data.items.ids) if validation is not None else None
    eval_every = _eval_every(config, trainer.batches.examples_per_epoch)
    prepared = time.perf_counter() - started

    state: dict[str, Any] = {
        "phase": "fit",
        "epoch": 0,
        "step": 0,
        "curves": [],
        "losses": [],
        "best_ndcg": -math.inf,
        "best_epoch": 0,
        "best_model": None,
        "stale": 0,
        "seconds": 0.0,
        "examples": 0,
        "wait_seconds": 0.0,
        "train_seconds": 0.0,
        "validation_seconds": 0.0,
    }
    if resumed is not None:
        state = resumed["loop"]  # a refit checkpoint carries the fit's final state
        if resumed["phase"] == "fit":
            trainer.load_state(resumed["trainer"])
    bar = tqdm(
        total=config.epochs * trainer.batches.steps_per_epoch,
        initial=state["epoch"] * trainer.batches.steps_per_epoch + state["step"],
        desc=f"train {config.loss}",
        unit="step",
        disable=not (progress and distributed.is_main()),
    )

    def checkpoint() -> None:
        at = {"epoch": state["epoch"], "step": state["step"]}
        checkpoints.save({"phase": "fit", **at, "trainer": trainer.state(), "loop": state})

    clock = time.perf_counter() - state["seconds"]  # elapsed time carries over a resume
    stop = resumed is not None and resumed["phase"] == "refit"
    while not stop and state["epoch"] < config.epochs:
        epoch = state["epoch"]
        model.train()
        prefetch = Prefetcher(trainer.batches, epoch, state["step"])
        epoch_started = time.perf_counter()
        try:
            for step, batch in prefetch:
                state["losses"].append(trainer.step(batch))
                state["step"], state["examples"] = step + 1, state["examples"] + batch.examples
                bar.update(1)
                if checkpoints.due(config.checkpoint_seconds) and state["step"] < trainer.batches.steps_per_epoch:
                    state["seconds"] = time.perf_counter() - clock
                    checkpoint()
        finally:
            prefetch.close()
        state["wait_seconds"] += prefetch.wait_seconds
        state["train_seconds"] += time.perf_counter() - epoch_started
        state["epoch"], state["step"] = epoch + 1, 0
        done = state["epoch"] == config.epochs
        # Rank 0's clock decides: every rank must take the same turn at the same epoch.
        out_of_time = distributed.broadcast(
            config.max_seconds is not None and time.perf_counter() - clock > config.max_seconds
        )
        if state["epoch"] % eval_every and not done and not out_of_time:
            continue
        decision = None
        if validation is not None and val_users is not None:
            validated = time.perf_counter()
            val = validation.score(embed_users(model, val_users), embed_items(model, data.items))
            state["validation_seconds"] += time.perf_counter() - validated
            state["curves"].append(
                {
                    "epoch": state["epoch"],
                    "loss": float(np.mean(state["losses"])) if state["losses"] else math.nan,
                    "val_ndcg@10": val.ndcg,
                    "seconds": time.perf_counter() - clock,
                }
            )
            bar.set_postfix(loss=f"{state['curves'][-1]['loss']:.4f}", val_ndcg=f"{val.ndcg:.4f}")
            if on_validation is not None:
                on_validation(state["epoch"], val)
            if val.ndcg > state["best_ndcg"]:
                gained = val.ndcg > state["best_ndcg"] * (1 + config.min_improvement)
                state["stale"] = 0 if gained else state["stale"] + 1
                state["best_ndcg"], state["best_epoch"] = val.ndcg, state["epoch"]
                state["best_model"] = copy.deepcopy(model.state_dict())
            else:
                state["stale"] += 1
            decision = "continue"
            if state["stale"] >= config.patience:
                log.info(
                    "early stop at epoch %d: best val NDCG@10 %.4f at epoch %d",
                    state["epoch"],
                    state["best_ndcg"],
                    state["best_epoch"],
                )
                decision = "stop"
            elif out_of_time:
                log.warning("stopping at epoch %d: max_seconds=%s reached", state["epoch"], config.max_seconds)
                decision = "stop"
        stop = distributed.broadcast(decision) == "stop"
        state["losses"] = []
        state["seconds"] = time.perf_counter() - clock
        checkpoint()
    bar.close()

    best_epoch = int(distributed.broadcast(state["best_epoch"]))
    stats = {
        "prepare_seconds": prepared,
        "examples_per_second": state["examples"] / max(state["train_seconds"], 1e-9),
        "wait_fraction": state["wait_seconds"] / max(state["train_seconds"], 1e-9),
        "validation_seconds": state["validation_seconds"],
        "epochs": state["epoch"],
        "steps_per_epoch": trainer.batches.steps_per_epoch,
        "eval_every": eval_every,
    }
    if warmed is not None:
        stats["warm_start_rows_copied"] = warmed.rows_copied
        stats["warm_start_rows_new"] = warmed.rows_new
    refit = _wants_refit(config, len(train))
    if refit:
        model = _refit(
            dataset, train, config, max(best_epoch, 1), device, checkpoints, resumed, state, progress, warm_from
        )
    elif state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    checkpoints.clear()
    model.eval()
    return FitResult(model, state["curves"], best_epoch, time.perf_counter() - started, refit, stats)


def _refit(
    dataset: Dataset,
    train: Interactions,
    config: TrainConfig,
    epochs: int,
    device: torch.device,
    checkpoints: Checkpoints,
    resumed: dict[str, Any] | None,
    fitted: dict[str, Any],
    progress: bool,
    warm_from: LoadedModel | None,
) -> TwoTower:
    """A fresh model trained on every training row for `epochs` epochs (no validation left to stop on); its
    checkpoints carry the fit's final state `fitted`, so a resumed run still knows what the fit found."""
    data = TrainingData(dataset, train, (distributed.rank(), distributed.world()))
    model, _ = _new_model(dataset, data, config, device, warm_from)
    trainer = Trainer(model, data, config, device)
    first_epoch, first_step = 0, 0
    if resumed is not None and resumed["phase"] == "refit":
        trainer.load_state(resumed["trainer"])
        first_epoch, first_step = resumed["epoch"], resumed["step"]
    model.train()
    steps = trainer.batches.steps_per_epoch
    with tqdm(
        total=epochs * steps,
        initial=first_epoch * steps + first_step,
        desc=f"refit {config.loss}",
        unit="step",
        disable=not (progress and distributed.is_main()),
    ) as bar:
        for epoch in range(first_epoch, epochs):
            prefetch = Prefetcher(trainer.batches, epoch, first_step if epoch == first_epoch else 0)
            try:
                for step, batch in prefetch:
                    trainer.step(batch)
                    bar.update(1)
                    if checkpoints.due(config.checkpoint_seconds) or step + 1 == steps:
                        at = (epoch, step + 1) if step + 1 < steps else (epoch + 1, 0)
                        state = {"phase": "refit", "epoch": at[0], "step": at[1], "trainer": trainer.state()}
                        checkpoints.save({**state, "loop": {**fitted, "best_model": None}})
            finally:
                prefetch.close()
    return model


# --------------------------------------------------------------------------- twotower train


@dataclass(frozen=True)
class Tuning:
    """A search to run before the final fit (`training.tune`): trials, a time bound, and where the study lives
    (a journal file path or a Redis URL; default `<artifacts>/tuning/<study>.journal`)."""

    trials: int
    seconds: float | None = None
    storage: str | None = None


def training_split(dataset: Dataset, holdout: float, seed: int) -> tuple[Interactions, Interactions]:
    """(training rows, test rows): `holdout` of the rows held out (DESIGN §4), none with holdout 0."""
    if holdout > 0:
        return split_random(dataset.interactions, holdout, seed=seed)
    return dataset.interactions, dataset.interactions.take(np.zeros(0, dtype=np.int64))


def search_recipe(
    dataset: Dataset, train: Interactions, config: TrainConfig, store: ArtifactStore, tuning: Tuning
) -> tuple[TrainConfig, dict[str, Any]]:
    """Run the search on the training rows; (the best recipe found, the search's record)."""
    from training import tune  # the tuner drives `fit`: imported here, not by everything that trains

    if distributed.world() > 1:
        raise ValueError("tuning runs its trials in one process each: share a study between processes instead")
    name = tune.study_name(dataset, config)
    storage = tune.storage_for(tuning.storage, store.root / "tuning" / f"{name}.journal")
    started = time.perf_counter()
    study = tune.search(
        dataset, train, config, trials=tuning.trials, seconds=tuning.seconds, storage=storage, name=name
    )
    return tune.tuned_config(config, study), tune.summary(study, time.perf_counter() - started)


def train_and_save(
    dataset: Dataset,
    store: ArtifactStore,
    config: TrainConfig,
    holdout: float = 0.2,
    progress: bool = True,
    test_users: int | None = None,
    tuning: Tuning | None = None,
    warm_from: LoadedModel | None = None,
    held_out: np.ndarray | None = None,
    record: dict[str, Any] | None = None,
) -> Path | None:
    """Split off `holdout` of the rows as a test set (DESIGN §4), tune the recipe on the rest when `tuning` asks
    for it, fit on the rest, evaluate on the test set beside the popularity baseline, and publish the model
    artifact (rank 0; the other ranks of a torchrun get None). With holdout=0 every row trains. A killed run
    started again with the same arguments resumes from its last checkpoint under `store`. `warm_from`: start from
    that model's weights where they carry over (recorded in the manifest). `held_out`: a boolean mask of
    `dataset.interactions`, the test set instead of a random `holdout` share (the retrain gate's newest events).
    `record`: more fields for the manifest's training record."""
    started = time.perf_counter()
    if held_out is not None:  # recorded as held_out_rows: `twotower evaluate` cannot redraw it as a random split
        train, test = dataset.interactions.take(~held_out), dataset.interactions.take(held_out)
        holdout, record = 0.0, {**(record or {}), "held_out_rows": int(held_out.sum())}
    else:
        train, test = training_split(dataset, holdout, config.seed)
    searched: dict[str, Any] | None = None
    if tuning is not None:
        config, searched = search_recipe(dataset, train, config, store, tuning)
        log.info("tuned recipe: %s (validation NDCG@10 %s)", searched["chosen_params"], searched["chosen_value"])
    key = run_key(dataset, config, holdout, held_out) + (f"-warm-{warm_from.version}" if warm_from is not None else "")
    result = fit(dataset, train, config, progress=progress, checkpoint_dir=store.root / "checkpoints" / key,
                 warm_from=warm_from)  # fmt: skip
    if not distributed.is_main():
        distributed.barrier()
        return None
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "refit": result.refit,
        "fit_seconds": round(result.seconds, 2),
        "best_val_ndcg@10": max((c["val_ndcg@10"] for c in result.curves), default=math.nan),
        **{name: round(value, 4) for name, value in result.stats.items()},
        "processes": distributed.world(),
    }
    if len(test):
        protocol = Protocol(train, test, test_users, seed=config.seed)
        metrics["test"] = evaluate(result.model, dataset, train, test, test_users).as_dict()
        metrics["test_popularity"] = protocol.popularity(train).as_dict()
    extra_files: dict[str, Callable[[Path], None]] = {
        "metrics.json": lambda p: write_json(p, {**metrics, "curves": result.curves, "tuning": searched}),
        "curves.png": lambda p: plot_curves(result.curves, p, f"{dataset.name} · {config.loss}"),
    }
    if searched is not None:
        history = searched["history"]
        extra_files["tuning.png"] = lambda p: plot_trials(
            history, p, f"{dataset.name} · {searched['study']}", searched["chosen_trial"]
        )
        metrics["tuning"] = {k: v for k, v in searched.items() if k != "history"}
    catalog = encode_item_frame(dataset.spec, result.model.vocabs, dataset.items)
    model_dir = save_model(
        store,
        result.model,
        catalog=dataset.items,
        users=users_table(dataset, train),
        item_embeddings=embed_items(result.model, catalog, progress=progress),
        training={
            **dataclasses.asdict(config),
            "tower": config.tower.to_dict(),
            "dataset": dataset.name,
            "holdout": holdout,
            "interactions": len(dataset.interactions),
            "train_rows": len(train),
            "warm_start_from": warm_from.version if warm_from is not None else None,
            **(record or {}),
        },
        metrics=metrics,
        extra_files=extra_files,
    )
    log.info("model %s written in %.1f s: %s", model_dir.name, time.perf_counter() - started, metrics)
    distributed.barrier()
    return model_dir
