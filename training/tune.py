"""Tuning the recipe on the validation slice: an Optuna study (TPE sampling, median pruning of weak trials),
bounded by trials and by seconds, whose chosen settings then train the final model.

A trial is `training.train.fit` with a sampled recipe on the fit rows, scored by its best validation NDCG@10 (the
test rows are never seen); it reports every validation pass, and the pruner stops one that falls below the median
of earlier trials at the same epoch. A new study's first trial is the recipe being tuned (`starting_point`), and
the search keeps it unless its best trial beats it by more than one standard error of the best's validation score
(`chosen_trial`): the best of many trials on one validation slice is partly the luck of that slice.
`SEARCH_SPACE` covers what moves quality on the development datasets (docs/loss.md): learning rate, history
fraction, temperature, dropouts, user features on or off, how a tower combines its parts, embedding size and weight
decay; epochs are left to early stopping.

The study lives in Optuna's own storage, so several processes or machines can share it: a journal file (default
`<artifacts>/tuning/<study>.journal`; on a shared file system for several machines) or Redis (`redis://...`, e.g.
the project's). Each `twotower tune` adds trials to the study named by the data and the recipe;
`twotower train --tune N` adds N more, then trains on the choice among everyone's trials. The search is recorded in the
model's manifest and metrics.json, and plotted (`tuning.png`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from training.config import TrainConfig, values_of, with_overrides
from training.dataset import Dataset, Interactions
from training.evaluate import RankingMetrics
from training.train import fit

log = logging.getLogger(__name__)

# name -> ("float", low, high, log) | ("int", choices...) | ("categorical", choices...)
SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "lr": ("float", 1e-3, 5e-2, True),
    "history_keep": ("float", 0.1, 0.7, False),
    "temperature": ("float", 0.05, 2.0, True),
    "id_dropout": ("float", 0.0, 0.5, False),
    "feature_dropout": ("float", 0.0, 0.5, False),
    # decades and 0 (the default: no decay), not a log range, which holds no 0: the first trial is the recipe itself
    "weight_decay": ("categorical", 0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    "use_user_features": ("categorical", True, False),
    "combine": ("categorical", "sum", "mlp"),
    "dim": ("categorical", 32, 64, 128, 256),
}
# Trials before the pruner may stop one, and before TPE samples from its model: with Optuna's default of 10, a
# search that a time budget limits to a few trials on a larger dataset would be random throughout. Then the
# validation passes every trial gets before it may be pruned.
STARTUP_TRIALS = 5
WARMUP_PASSES = 2
# Trial user attributes: the recipe being tuned, and the standard error of a trial's best validation NDCG@10.
STARTING_POINT = "starting_point"
STANDARD_ERROR = "val_ndcg@10_se"


def study_name(dataset: Dataset, base: TrainConfig) -> str:
    """The study a run joins: the same data, base recipe (seed aside) and search space share one (Optuna refuses a
    parameter whose distribution changed within a study)."""
    description = {
        "space": SEARCH_SPACE,
        "dataset": dataset.name,
        "interactions": len(dataset.interactions),
        "config": {**dataclasses.asdict(dataclasses.replace(base, seed=0)), "tower": base.tower.to_dict()},
    }
    digest = hashlib.blake2b(json.dumps(description, sort_keys=True, default=str).encode(), digest_size=8)
    return f"{dataset.name}-{base.loss}-{digest.hexdigest()}"


def storage_for(url: str | None, default: Path) -> optuna.storages.BaseStorage:
    """Optuna's journal storage on Redis (`redis://`, `rediss://`, `unix://`) or in a file (a path; default
    `default`)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    if url and url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        return JournalStorage(JournalRedisBackend(url))
    path = Path(url) if url else default
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def suggest(trial: optuna.Trial, space: Mapping[str, tuple[Any, ...]] = SEARCH_SPACE) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (kind, *spec) in space.items():
        if kind == "float":
            low, high, log_scale = spec
            values[name] = trial.suggest_float(name, low, high, log=log_scale)
        else:
            values[name] = trial.suggest_categorical(name, list(spec))
    return values


def starting_point(base: TrainConfig, space: Mapping[str, tuple[Any, ...]] = SEARCH_SPACE) -> dict[str, Any]:
    """`base`'s values of the searched settings, each brought inside its range; a choice the space does not offer is
    left for the sampler."""
    values = values_of(base, space)
    for name, (kind, *spec) in space.items():
        if kind == "float":
            values[name] = min(max(float(values[name]), spec[0]), spec[1])
        elif values[name] not in spec:
            del values[name]
    return values


def search(
    dataset: Dataset,
    train: Interactions,
    base: TrainConfig,
    *,
    trials: int,
    seconds: float | None,
    storage: optuna.storages.BaseStorage,
    name: str,
    space: Mapping[str, tuple[Any, ...]] = SEARCH_SPACE,
) -> optuna.Study:
    """Add up to `trials` trials (within `seconds`) to study `name` in `storage`; returns the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Seeded by the trials already in the study: reproducible alone, and a worker joining later samples afresh.
    existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}.get(name, 0)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed + existing, n_startup_trials=STARTUP_TRIALS),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=WARMUP_PASSES),
    )
    if existing == 0:  # a new study starts from the recipe it tunes, the trial the search must beat
        study.enqueue_trial(starting_point(base, space), user_attrs={STARTING_POINT: True}, skip_if_exists=True)
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space)
        limits = [x for x in (base.max_seconds, None if seconds is None else seconds - (time.perf_counter() - started))]
        budget = min((x for x in limits if x is not None), default=None)
        config = with_overrides(dataclasses.replace(base, refit="never", max_seconds=budget), values)
        passes, best = 0, None

        def report(epoch: int, val: RankingMetrics) -> None:
            nonlocal passes, best
            trial.report(val.ndcg, passes)
            passes += 1
            if best is None or val.ndcg > best.ndcg:
                best = val
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation NDCG@10 {val.ndcg:.4f} at epoch {epoch}")

        result = fit(dataset, train, config, progress=False, on_validation=report)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("seconds", result.seconds)
        if best is None:
            return 0.0
        trial.set_user_attr(STANDARD_ERROR, best.ndcg_se)
        log.info("trial %d: validation NDCG@10 %.4f with %s", trial.number, best.ndcg, values)
        return best.ndcg

    if trials > 0:
        study.optimize(objective, n_trials=trials, timeout=seconds, gc_after_trial=True)
    return study


def chosen_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial whose settings train the final model: the best one, unless the starting point (the recipe being
    tuned) is within one standard error of it on validation (the one-standard-error rule), then the starting
    point. None while no trial has finished."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    start = next((t for t in complete if t.user_attrs.get(STARTING_POINT)), None)
    if start is None:  # the recipe's own trial has not finished: another worker runs it, or it failed
        return best
    gain = float(best.value or 0.0) - float(start.value or 0.0)
    # A NaN margin (one validation user) never holds: the best is kept.
    return start if gain <= best.user_attrs.get(STANDARD_ERROR, 0.0) else best


def summary(study: optuna.Study, seconds: float) -> dict[str, Any]:
    """What the manifest and metrics.json record of a search."""
    states = [t.state.name.lower() for t in study.trials]
    chosen = chosen_trial(study)
    return {
        "study": study.study_name,
        "trials": len(study.trials),
        "complete": states.count("complete"),
        "pruned": states.count("pruned"),
        "seconds": round(seconds, 1),
        "best_value": study.best_value if chosen else None,
        "best_params": study.best_params if chosen else {},
        "best_standard_error": study.best_trial.user_attrs.get(STANDARD_ERROR) if chosen else None,
        "chosen_trial": chosen.number if chosen else None,
        "chosen_is_starting_point": bool(chosen and chosen.user_attrs.get(STARTING_POINT)),
        "chosen_value": chosen.value if chosen else None,
        "chosen_params": chosen.params if chosen else {},
        "history": [
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value if t.value is not None else (max(t.intermediate_values.values(), default=math.nan)),
                "params": t.params,
            }
            for t in study.trials
        ],
    }


def tuned_config(base: TrainConfig, study: optuna.Study) -> TrainConfig:
    """`base` with the settings of the study's `chosen_trial` (or `base` itself while no trial has finished)."""
    chosen = chosen_trial(study)
    return with_overrides(base, chosen.params) if chosen else base
