"""`twotower retrain`: the feedback loop as one command: export the service's event log, train on the base data
plus the exported events, and re-index and publish only a model that is not worse than the one serving.

    export   `training.event_export`: the log into Parquet partitions under `<artifacts>/events/`
    hold out the newest `GATE_SHARE` of the events the active model has not had as data (its manifest records how
             many exported events, oldest first, it had: `EVENTS_SEEN`), less pairs seen before them; fewer than
             `min_gate_events` of them and nothing is trained (there is too little new to judge a model on)
    train    the base data with the other events (`training.dataset.with_events`: new users and items join), the
             active model's recipe unless told otherwise, warm-started from the active model's weights where the
             towers match (`training.warm_start`); validation for early stopping is carved from these rows
    gate     both models rank the catalog for the held-out events' users, with the same histories (every row but
             the held-out ones) and the same metric (`training.evaluate`): the new model's NDCG@10 more than
             `tolerance` below the active model's, and nothing is published (the model artifact stays, for a look)
    publish  `training.reindex.reindex`: the index is built, checked, published, made active and announced in
             Redis, where running services swap to it without a restart

Both models are scored on events neither trained on, the newest ones, which is what the next model will be asked
to predict. The published model has not trained on its gate's events; the next retrain does (they are then older
than its own held-out share).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.artifacts import ArtifactError, ArtifactStore, load_model
from training.config import TrainConfig, with_overrides
from training.dataset import Dataset, with_events
from training.evaluate import evaluate
from training.event_export import SCHEMA, export_events, read_events
from training.reindex import reindex
from training.train import train_and_save

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01  # NDCG@10 on the held-out events, absolute
GATE_SHARE = 0.2  # of the events new to the active model: the newest this share judge both models
MIN_GATE_EVENTS = 50  # held-out events at least; fewer and the two scores differ by noise alone
EVENTS_SEEN = "events_seen"  # the manifest's training-record field: exported events, oldest first, in its data


@dataclass
class RetrainResult:
    published: bool
    reason: str
    model_version: str | None = None
    index_version: str | None = None
    previous_model: str | None = None
    gate_events: int = 0
    gate_users: int = 0  # whose held-out events they are: the gate's sample size, which sets its noise
    gate_ndcg: float | None = None  # the new model's NDCG@10 on the held-out events
    previous_gate_ndcg: float | None = None  # the active model's, on the same events with the same histories
    popularity_gate_ndcg: float | None = None  # the floor: the training counts as scores
    warm_start: bool = False
    export: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def held_out_rows(base: Dataset, dataset: Dataset, events: pd.DataFrame, first: int) -> np.ndarray:
    """Boolean mask of `dataset.interactions` (`base` plus `events`, merged by `with_events`): the rows of the events
    from position `first` on, less the pairs seen before them (in `base` or an earlier event). A repeated (user,
    item) would be judged against a model that trained on it and a model that did not, and `with_events` keeps only
    one row of it, so it is not held out; a row is matched by its pair and whole-second timestamp."""
    rows = dataset.interactions
    users, items = pd.Index(rows.user_ids, dtype=object), pd.Index(rows.item_ids, dtype=object)
    width = np.int64(len(items))

    def keys(user: np.ndarray, item: np.ndarray) -> np.ndarray:
        return user.astype(np.int64) * width + item.astype(np.int64)

    known = base.interactions
    before = keys(
        users.get_indexer(pd.Index(known.user_ids, dtype=object))[known.user],
        items.get_indexer(pd.Index(known.item_ids, dtype=object))[known.item],
    )
    logged = keys(
        users.get_indexer(pd.Index(events["user_id"], dtype=object)),
        items.get_indexer(pd.Index(events["item_id"], dtype=object)),
    )
    late, stamps = logged[first:], np.floor(events["timestamp"].to_numpy(np.float64)[first:]).astype(np.int64)
    fresh = ~np.isin(late, np.concatenate([before, logged[:first]]))
    held = np.zeros(len(rows), dtype=bool)
    if fresh.any():
        start = int(np.searchsorted(rows.timestamp, stamps[fresh].min()))  # rows are in time order
        candidates = pd.MultiIndex.from_arrays([keys(rows.user[start:], rows.item[start:]), rows.timestamp[start:]])
        held[start:] = candidates.isin(pd.MultiIndex.from_arrays([late[fresh], stamps[fresh]]))
    return held


def retrain(
    base: Dataset,
    store: ArtifactStore,
    redis_url: str,
    redis_prefix: str,
    *,
    events_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    warm: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    min_gate_events: int = MIN_GATE_EVENTS,
    progress: bool = True,
) -> RetrainResult:
    """Export, hold out, train, gate and publish (module docstring)."""
    if min_gate_events < 1:
        raise ValueError(f"min_gate_events is at least 1 (got {min_gate_events}): a gate needs events to judge on")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    events_dir = events_dir or store.root / "events"
    exported = export_events(redis_url, events_dir, redis_prefix)
    seconds["export"] = time.perf_counter() - started
    log.info("exported %d events (%d dropped by the log's bound)", exported.exported, exported.dropped)

    try:
        previous = load_model(store.model_dir(store.active_model()))
    except ArtifactError:
        previous = None  # nothing trained yet: the first model has nothing to be compared with
    recipe = TrainConfig.from_record(previous.manifest["training"]) if previous is not None else TrainConfig()
    config = with_overrides(recipe, overrides or {})
    warm_from = previous if warm and previous is not None and previous.model.config == config.tower else None
    if warm and previous is not None and warm_from is None:
        log.warning("towers configured unlike model %s's: training cold", previous.version)
    result = RetrainResult(
        published=False,
        reason="",
        previous_model=previous.version if previous is not None else None,
        warm_start=warm_from is not None,
        export=exported.as_dict(),
        seconds=seconds,
    )

    events = read_events(events_dir) if exported.cursor is not None else pd.DataFrame(columns=list(SCHEMA.names))
    seen = 0
    if previous is not None:
        if EVENTS_SEEN not in previous.manifest["training"]:
            log.warning("model %s records no %s: every exported event counts as new to it", previous.version,
                        EVENTS_SEEN)  # fmt: skip
        seen = min(int(previous.manifest["training"].get(EVENTS_SEEN, 0)), len(events))
    gate_events = math.floor(GATE_SHARE * (len(events) - seen)) if previous is not None else 0
    if previous is not None and gate_events < min_gate_events:
        result.reason = (
            f"nothing trained: {len(events) - seen} events are new to the active model {previous.version}; a retrain "
            f"waits for {math.ceil(min_gate_events / GATE_SHARE)}, so that the newest {GATE_SHARE:.0%} of them "
            f"({min_gate_events}) can judge the new model against it"
        )
        return result
    dataset = base if not len(events) else with_events(base, events["user_id"], events["item_id"], events["timestamp"])
    held_out = None
    if previous is not None:
        held_out = held_out_rows(base, dataset, events, len(events) - gate_events)
        if held_out.sum() < min_gate_events:
            result.reason = (
                f"nothing trained: of the newest {gate_events} events, {int(held_out.sum())} are (user, item) pairs "
                f"not seen before, and the gate judges on those only; it needs {min_gate_events}"
            )
            return result
    started = time.perf_counter()
    model_dir = train_and_save(dataset, store, config, holdout=0.0, progress=progress, warm_from=warm_from,
                               held_out=held_out, record={EVENTS_SEEN: len(events) - gate_events})  # fmt: skip
    seconds["train"] = time.perf_counter() - started
    assert model_dir is not None  # one process
    model = load_model(model_dir)
    result.model_version = model.version
    if held_out is None:
        # The first model: nothing to compare with; its own validation says whether it learned anything.
        if not math.isfinite(float(model.manifest["metrics"].get("best_val_ndcg@10", math.nan))):
            result.reason = f"model {model.version} has no validation NDCG@10 (too little data to validate on)"
            return result
    else:
        assert previous is not None
        test = dataset.interactions.take(held_out)
        result.gate_events, result.gate_users = len(test), int(model.manifest["metrics"]["test"]["users"])
        result.gate_ndcg = model.manifest["metrics"]["test"]["ndcg@10"]
        result.popularity_gate_ndcg = model.manifest["metrics"]["test_popularity"]["ndcg@10"]
        result.previous_gate_ndcg = evaluate(previous.model, dataset, dataset.interactions.take(~held_out), test).ndcg
        if result.gate_ndcg < result.previous_gate_ndcg - tolerance:
            result.reason = (
                f"model {model.version} not published: NDCG@10 {result.gate_ndcg:.4f} on the newest "
                f"{result.gate_events} events ({result.gate_users} users) is more than {tolerance} below the active "
                f"model {previous.version}'s {result.previous_gate_ndcg:.4f} on the same events"
            )
            return result
    started = time.perf_counter()
    result.index_version = reindex(
        store, model_version=model.version, redis_url=redis_url, redis_prefix=redis_prefix, progress=progress
    )
    seconds["reindex"] = time.perf_counter() - started
    result.published = True
    result.reason = f"model {model.version} published as index {result.index_version}" + (
        f": NDCG@10 {result.gate_ndcg:.4f} on the newest {result.gate_events} events ({result.gate_users} users), "
        f"the active model {previous.version} {result.previous_gate_ndcg:.4f}, popularity "
        f"{result.popularity_gate_ndcg:.4f}"
        if previous is not None and result.gate_ndcg is not None
        else " (the first model)"
    )
    return result
