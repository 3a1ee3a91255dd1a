"""`TrainConfig`, the training recipe, and `with_overrides`: the ONE way any of its settings (and the tower's) is
changed by name, from the command line, a tuner or a benchmark.

Every field of `TrainConfig` and of its `TowerConfig` (`training.model`) has a flat name (`lr`, `history_keep`,
`dim`, `combine`, ...) and a help text in its metadata. `with_overrides(config, {"lr": "3e-3", "dim": 32})`
returns a new config; it refuses an unknown name and a value of the wrong type (nanoGPT's configurator does the
same), and parses text by the field's type, so `--lr 3e-3` on the command line and `{"lr": 0.003}` from a tuner are
the same change. `twotower train` generates one flag per name from `settable_fields()`, so every setting is on
the command line and none is copied by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from training.losses import LossName
from training.model import TowerConfig


class ConfigError(ValueError):
    """An override names no setting, or gives a value its type cannot take; the message names both."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; defaults are the recipe measured best (docs/loss.md; benchmarks/quality.py)."""

    loss: LossName = field(default="softmax", metadata={"help": "training loss (docs/loss.md)"})
    epochs: int = field(
        default=400, metadata={"help": "most epochs; early stopping and max_seconds usually end training sooner"}
    )
    batch_size: int = field(
        default=8192,
        metadata={
            "help": "examples (a user's items drawn into a step, history and positives) per step and process; "
            "a step takes whole users until it holds this many"
        },
    )
    max_user_items: int = field(
        default=1024,
        metadata={"help": "items of one user drawn into a step at most (a random subset of a heavier user's)"},
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "epochs between validation passes; 0: about every 500,000 examples, at least every epoch"},
    )
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "weight decay: Adam's on dense parameters; on sparse tables, decoupled on the rows a step touches"
        },
    )
    optimizer: Literal["sparse", "dense"] = field(
        default="sparse",
        metadata={
            "help": "sparse: id and history embedding tables get sparse gradients and SparseAdam (state only for "
            "the rows a step touches), the rest Adam; dense: Adam on everything"
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature (unnormalised towers learn the scale in their embeddings)"}
    )
    margin: float = field(
        default=0.3,
        metadata={"help": "triplet: hinge margin (with hard_negatives: in units of |u| |v+|, i.e. of cosine)"},
    )
    # 75 of the pool's 1024: first of 50, 75 and 100 by mean rank of validation NDCG@10 over both development
    # datasets (MovieLens gains up to 100, citeulike-a loses beyond 75; docs/loss.md, round 8)
    hard_negatives: int = field(
        default=75,
        metadata={
            "help": "triplet: the highest-scoring negatives of the mining pool each positive is held against; "
            "0: one negative drawn per positive"
        },
    )
    negative_pool: int = field(
        default=1024,
        metadata={
            "help": "triplet with hard_negatives: items drawn uniformly per step (split over the processes), the "
            "pool its hard negatives are mined from; 0: mined among the batch's columns (drawn by popularity)"
        },
    )
    negatives: Literal["uniform", "popularity"] = field(
        default="uniform", metadata={"help": "bpr/triplet: how negatives are drawn"}
    )
    logq: bool = field(default=True, metadata={"help": "softmax: logQ correction of in-batch negatives"})
    uniform_negatives: int = field(
        default=0, metadata={"help": "softmax: extra negative columns drawn uniformly from the catalog"}
    )
    history_keep: float = field(
        default=0.3,
        metadata={"help": "fraction of a user's items shown as history per step; the rest are that step's positives"},
    )
    id_dropout: float = field(
        default=0.1, metadata={"help": "chance an example's user/item id is replaced by unknown (trains cold start)"}
    )
    feature_dropout: float = field(
        default=0.0, metadata={"help": "chance each of a user's features is replaced by unknown"}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the training rows held out for early stopping"}
    )
    val_users: int = field(
        default=10_000, metadata={"help": "validation users at most (a seeded sample on larger data)"}
    )
    patience: int = field(default=5, metadata={"help": "validation passes without improvement before stopping"})
    min_improvement: float = field(
        default=0.001,
        metadata={"help": "relative gain in validation NDCG@10 below which a pass counts as no improvement"},
    )
    seed: int = field(default=0, metadata={"help": "split and training seed"})
    max_seconds: float | None = field(default=3600.0, metadata={"help": "time budget of the fit, in seconds"})
    refit: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={
            "help": "after early stopping picks the epoch count, retrain from scratch on every training row (the "
            "validation slice included) for that many epochs; auto: only on data small enough for it to pay "
            "(training.train.REFIT_MAX_ROWS)"
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda or cuda:N"})
    checkpoint_seconds: float = field(
        default=300.0, metadata={"help": "seconds between checkpoints within an epoch (a killed run resumes)"}
    )
    tower: TowerConfig = field(default_factory=TowerConfig)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tower": self.tower.to_dict()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainConfig:
        """The recipe a model manifest's `training` record holds (`to_dict` plus facts of the run, ignored)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"tower"}
        return cls(**{k: v for k, v in record.items() if k in names}, tower=TowerConfig.from_dict(record["tower"]))


@dataclass(frozen=True)
class Setting:
    """One settable name: which config holds it, its type and default, and its help."""

    name: str
    owner: type  # TrainConfig or TowerConfig
    hint: Any
    default: Any
    help: str

    @property
    def is_bool(self) -> bool:
        return self.hint is bool


def settable_fields() -> dict[str, Setting]:
    """Every setting by its flat name: TrainConfig's fields, then TowerConfig's (names never clash)."""
    out: dict[str, Setting] = {}
    for owner in (TrainConfig, TowerConfig):
        hints = typing.get_type_hints(owner)
        defaults = owner()
        for f in dataclasses.fields(owner):
            if f.name == "tower":
                continue
            if f.name in out:
                raise TypeError(f"setting {f.name!r} is defined by both TrainConfig and TowerConfig")
            help_text = f.metadata.get("help", "")
            out[f.name] = Setting(f.name, owner, hints[f.name], getattr(defaults, f.name), help_text)
    return out


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_value(name: str, hint: Any, value: Any) -> Any:
    """`value` as the type `hint` names: text is parsed, anything else must already be of that type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(name, inner, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"setting {name!r} takes one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:  # tuple[int, ...]
        parts = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
        return tuple(parse_value(name, args[0], p) for p in parts)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"setting {name!r} is true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError as e:
                raise ConfigError(f"setting {name!r} takes {hint.__name__}, got {value!r}") from e
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (hint is int and not float(value).is_integer())
        ):
            raise ConfigError(f"setting {name!r} takes {hint.__name__}, got {type(value).__name__} {value!r}")
        return hint(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"setting {name!r} takes {hint}, got {type(value).__name__} {value!r}")


# What a loss needs beside it, applied when the loss is chosen and those settings are not: the triplet hinge's margin
# is in units of cosine and its hard negatives are mined by score, so its towers L2-normalise (docs/loss.md).
LOSS_SETTINGS: dict[str, dict[str, Any]] = {"triplet": {"normalize": True}}


def values_of(config: TrainConfig, names: Iterable[str]) -> dict[str, Any]:
    """The settings `names` (flat names, see `settable_fields`) as `config` holds them: the inverse of
    `with_overrides`."""
    settings = settable_fields()
    return {name: getattr(config.tower if settings[name].owner is TowerConfig else config, name) for name in names}


def with_overrides(config: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """A copy of `config` with `values` (flat setting names, see `settable_fields`) applied, and the settings the
    chosen loss needs (`LOSS_SETTINGS`) where `values` does not give them; `ConfigError` for an unknown name or a
    value its type cannot take."""
    if "loss" in values:
        values = {**LOSS_SETTINGS.get(str(values["loss"]), {}), **values}
    settings = settable_fields()
    unknown = sorted(set(values) - settings.keys())
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; the settings are {sorted(settings)}")
    train: dict[str, Any] = {}
    tower: dict[str, Any] = {}
    for name, value in values.items():
        setting = settings[name]
        parsed = parse_value(name, setting.hint, value)
        (tower if setting.owner is TowerConfig else train)[name] = parsed
    return dataclasses.replace(config, **train, tower=dataclasses.replace(config.tower, **tower))
