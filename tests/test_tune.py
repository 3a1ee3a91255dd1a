"""`training.tune`: on planted data the search finds a far better recipe than a deliberately bad start, its study
is shared through its storage (a second search adds to the same trials), the recipe being tuned is kept unless the
best trial beats it by more than a standard error, and a tuned `train_and_save` records the search and trains with
the chosen settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from tests.helpers import TINY_CONFIG
from training.artifacts import ArtifactStore, load_model
from training.config import TrainConfig, with_overrides
from training.dataset import Dataset, split_random
from training.train import Tuning, fit, train_and_save
from training.tune import (
    SEARCH_SPACE,
    STANDARD_ERROR,
    STARTING_POINT,
    chosen_trial,
    search,
    starting_point,
    storage_for,
    study_name,
    summary,
    tuned_config,
)

BAD = replace(TINY_CONFIG, lr=1e-5, epochs=6, eval_every=2, patience=3)  # learns next to nothing in 6 epochs
SPACE = {"lr": SEARCH_SPACE["lr"], "history_keep": SEARCH_SPACE["history_keep"]}


def test_the_search_beats_a_bad_start_and_shares_its_study(tiny_dataset: Dataset, tmp_path: Path) -> None:
    train, _ = split_random(tiny_dataset.interactions, 0.2, seed=BAD.seed)
    start = max(c["val_ndcg@10"] for c in fit(tiny_dataset, train, BAD, progress=False).curves)
    journal = tmp_path / "study.journal"
    name = study_name(tiny_dataset, BAD)
    study = search(
        tiny_dataset,
        train,
        BAD,
        trials=4,
        seconds=None,
        storage=storage_for(str(journal), journal),
        name=name,
        space=SPACE,
    )
    assert len(study.trials) == 4 and journal.is_file()
    assert study.best_value > start + 0.05, (study.best_value, start)
    assert SEARCH_SPACE["lr"][1] <= study.best_params["lr"] <= SEARCH_SPACE["lr"][2]
    again = search(
        tiny_dataset,
        train,
        BAD,
        trials=2,
        seconds=None,
        storage=storage_for(str(journal), journal),
        name=name,
        space=SPACE,
    )
    assert len(again.trials) == 6  # another process naming the same study adds to it


def test_a_new_study_first_tries_the_recipe_it_tunes(tiny_dataset: Dataset, tmp_path: Path) -> None:
    start = replace(BAD, lr=2e-3, history_keep=0.4)  # inside the searched ranges
    train, _ = split_random(tiny_dataset.interactions, 0.2, seed=start.seed)
    curves = fit(tiny_dataset, train, replace(start, refit="never"), progress=False).curves
    untuned = max(c["val_ndcg@10"] for c in curves)
    journal = tmp_path / "study.journal"
    storage = storage_for(str(journal), journal)
    study = search(tiny_dataset, train, start, trials=2, seconds=None, storage=storage, name="s", space=SPACE)
    first = study.trials[0]
    assert first.params == {"lr": 2e-3, "history_keep": 0.4}
    assert first.value == pytest.approx(untuned)
    again = search(tiny_dataset, train, start, trials=1, seconds=None, storage=storage, name="s", space=SPACE)
    assert [t.params for t in again.trials].count(first.params) == 1  # a study that has trials is not restarted


def _study(start: float, best: float, standard_error: float) -> optuna.Study:
    """A study holding a finished starting point and a finished better trial with these validation scores."""
    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True)
    for value, params, attrs in ((start, 3e-3, {STARTING_POINT: True}), (best, 1e-2, {})):
        attrs = {**attrs, STANDARD_ERROR: standard_error}
        study.add_trial(optuna.trial.create_trial(params={"lr": params}, distributions={"lr": lr}, value=value,
                                                  user_attrs=attrs))  # fmt: skip
    return study


def test_the_recipe_is_kept_unless_the_best_beats_it_by_more_than_a_standard_error() -> None:
    within = _study(start=0.200, best=0.204, standard_error=0.005)
    assert chosen_trial(within).params == {"lr": 3e-3}
    assert tuned_config(BAD, within).lr == 3e-3
    assert summary(within, 1.0)["chosen_is_starting_point"] and summary(within, 1.0)["best_params"] == {"lr": 1e-2}
    beyond = _study(start=0.200, best=0.206, standard_error=0.005)
    assert chosen_trial(beyond).params == {"lr": 1e-2} and tuned_config(BAD, beyond).lr == 1e-2
    assert not summary(beyond, 1.0)["chosen_is_starting_point"]


def test_the_first_trial_of_the_default_recipe_is_that_recipe_exactly() -> None:
    recipe = TrainConfig()
    assert with_overrides(recipe, starting_point(recipe)) == recipe


def test_the_starting_point_lies_inside_the_space() -> None:
    point = starting_point(replace(BAD, weight_decay=0.0, tower=replace(BAD.tower, dim=48)))
    assert point["weight_decay"] == 0.0  # offered as it is: the first trial is the recipe, not a near neighbour
    assert point["lr"] == SEARCH_SPACE["lr"][1]  # BAD's 1e-5 is below the range
    assert "dim" not in point  # 48 is not offered: the sampler picks
    assert point["combine"] == BAD.tower.combine and point["history_keep"] == BAD.history_keep


@pytest.mark.slow
def test_a_tuned_training_records_its_search_and_uses_the_best_settings(tiny_dataset: Dataset, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    model_dir = train_and_save(tiny_dataset, store, BAD, progress=False, tuning=Tuning(trials=3))
    assert model_dir is not None
    manifest = load_model(model_dir).manifest
    tuning = manifest["metrics"]["tuning"]
    assert tuning["trials"] == 3 and tuning["best_params"] and tuning["best_standard_error"] > 0
    assert tuning["chosen_params"] and tuning["chosen_trial"] in range(3)
    assert manifest["training"]["lr"] == pytest.approx(tuning["chosen_params"]["lr"])
    assert (model_dir / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tuning").glob("*.journal"))  # the study stays for the next run to build on
