"""`training.config`: every field of TrainConfig and TowerConfig is settable by one flat name, text is parsed by the
field's type, and unknown names or values of the wrong type are refused."""

from __future__ import annotations

import dataclasses

import pytest

from training.config import ConfigError, TrainConfig, settable_fields, with_overrides
from training.model import TowerConfig


def test_every_field_of_both_configs_is_a_setting_with_help() -> None:
    settings = settable_fields()
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "tower"}
    assert set(settings) == fields | {f.name for f in dataclasses.fields(TowerConfig)}
    assert all(setting.help for setting in settings.values())


def test_overrides_parse_text_by_type_and_leave_the_rest_alone() -> None:
    base = TrainConfig()
    config = with_overrides(
        base,
        {"lr": "3e-3", "epochs": "7", "logq": "false", "max_seconds": "none", "dim": 32, "hidden": "128,64"},
    )
    assert (config.lr, config.epochs, config.logq, config.max_seconds) == (3e-3, 7, False, None)
    assert (config.tower.dim, config.tower.hidden) == (32, (128, 64))
    unchanged = dataclasses.replace(
        config, lr=base.lr, epochs=base.epochs, logq=base.logq, max_seconds=base.max_seconds
    )
    assert unchanged == dataclasses.replace(base, tower=config.tower)
    assert with_overrides(base, {"epochs": 5.0, "history_keep": 1}).epochs == 5  # whole numbers from a tuner


def test_choosing_the_triplet_loss_brings_the_normalised_towers_it_needs_unless_told_otherwise() -> None:
    assert with_overrides(TrainConfig(), {"loss": "triplet"}).tower.normalize is True
    assert with_overrides(TrainConfig(), {"loss": "triplet", "normalize": "false"}).tower.normalize is False
    assert with_overrides(TrainConfig(), {"loss": "softmax"}).tower.normalize is TrainConfig().tower.normalize


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 0.1}, "unknown setting 'learning_rate'"),
        ({"tower": "x"}, "unknown setting 'tower'"),
        ({"lr": "fast"}, "setting 'lr' takes float"),
        ({"epochs": 2.5}, "setting 'epochs' takes int"),
        ({"epochs": True}, "setting 'epochs' takes int"),
        ({"logq": "maybe"}, "setting 'logq' is true or false"),
        ({"refit": "yes"}, "setting 'refit' takes one of"),
        ({"loss": "hinge"}, "setting 'loss' takes one of"),
        ({"hidden": "64,x"}, "setting 'hidden' takes int"),
    ],
)
def test_unknown_names_and_wrong_types_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_overrides(TrainConfig(), values)
