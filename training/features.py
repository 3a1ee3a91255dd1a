"""Feature spec, vocabularies and the ONE encoding of raw inputs into index arrays.

Owned here and imported by both sides: the trainer encodes the training split with `encode_users` /
`encode_items`; the service encodes each request with the very same functions, so a feature can never be
bucketed one way in training and another way online. `encode_user_frame` / `encode_item_frame` are the one
adapter from a users or items table (id index, raw feature columns) to those functions.

Conventions every tower relies on:
- index 0 of every vocabulary is "unknown": an id or feature value not seen in the training split. For
  single-valued features and ids it is a learned out-of-vocabulary embedding (the trainer drops ids to 0 at
  random so it learns something useful); for multi-valued features and histories 0 is padding and is masked
  out of the mean, so an unknown genre or an item unknown to the model simply contributes nothing.
- histories are item ids newest first, truncated to `FeatureSpec.max_history`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

FeatureKind = Literal["categorical", "bucket", "prefix", "multi"]
UNKNOWN = 0  # index of the unknown / padding entry in every vocabulary


@dataclass(frozen=True)
class FeatureDef:
    """One raw feature and how it becomes tokens: verbatim, numeric bucket, string prefix, or a set."""

    name: str
    kind: FeatureKind = "categorical"
    boundaries: tuple[float, ...] = ()  # kind="bucket": sorted cut points
    prefix_len: int = 0  # kind="prefix"
    max_values: int = 8  # kind="multi": values kept per row

    @property
    def width(self) -> int:
        return self.max_values if self.kind == "multi" else 1

    def tokens(self, raw: Any) -> list[str]:
        """Canonical string tokens for one raw value; missing or unparsable values give no token."""
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return []
        if self.kind == "multi":
            # a string is "a|b"; a list, tuple or array (Parquet gives arrays) is the values; a scalar is one value
            values = raw.split("|") if isinstance(raw, str) else list(raw) if np.iterable(raw) else [raw]
            return [str(v) for v in values if str(v) != ""][: self.max_values]
        text = str(raw).strip()
        if text == "":
            return []
        if self.kind == "categorical":
            return [text]
        if self.kind == "prefix":
            return [text[: self.prefix_len]]
        try:
            number = float(text)
        except ValueError:
            return []
        if math.isnan(number):
            return []
        return [f"bucket{bisect.bisect_right(self.boundaries, number)}"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "boundaries": list(self.boundaries)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureDef:
        return cls(**{**data, "boundaries": tuple(data.get("boundaries", ()))})


@dataclass(frozen=True)
class FeatureSpec:
    """Which raw user and item features the towers consume, and the history length."""

    user_features: tuple[FeatureDef, ...] = ()
    item_features: tuple[FeatureDef, ...] = ()
    max_history: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_features": [f.to_dict() for f in self.user_features],
            "item_features": [f.to_dict() for f in self.item_features],
            "max_history": self.max_history,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            user_features=tuple(FeatureDef.from_dict(f) for f in data["user_features"]),
            item_features=tuple(FeatureDef.from_dict(f) for f in data["item_features"]),
            max_history=int(data["max_history"]),
        )


class Vocabulary:
    """Token -> index, with 0 reserved for unknown. Order is the training split's first-seen order sorted."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens: list[str] = list(tokens)
        self._index = {token: i + 1 for i, token in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    def __len__(self) -> int:
        """Number of embedding rows, the unknown row included."""
        return len(self.tokens) + 1

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def lookup(self, token: str) -> int:
        return self._index.get(token, UNKNOWN)

    def lookup_list(self, tokens: Iterable[Any]) -> list[int]:
        """Indices of `tokens` (each taken as its str), as a list: the per-request path's form."""
        get = self._index.get
        return [get(str(t), UNKNOWN) for t in tokens]

    def lookup_many(self, tokens: Iterable[str]) -> np.ndarray:
        index = self._index
        return np.fromiter((index.get(t, UNKNOWN) for t in tokens), dtype=np.int64)


@dataclass
class Vocabularies:
    """All vocabularies of one model: ids and each feature's tokens, built from the training split only."""

    user_ids: Vocabulary
    item_ids: Vocabulary
    features: dict[str, Vocabulary] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_ids": self.user_ids.tokens,
            "item_ids": self.item_ids.tokens,
            "features": {name: v.tokens for name, v in sorted(self.features.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabularies:
        return cls(
            user_ids=Vocabulary(data["user_ids"]),
            item_ids=Vocabulary(data["item_ids"]),
            features={name: Vocabulary(tokens) for name, tokens in data["features"].items()},
        )

    def digest(self) -> str:
        """Stable hash recorded in manifests so a model and its vocabularies can't be mixed up."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(payload).hexdigest()

    def sizes(self) -> dict[str, int]:
        return {
            "user_ids": len(self.user_ids),
            "item_ids": len(self.item_ids),
            **{name: len(v) for name, v in self.features.items()},
        }


def build_vocabularies(
    spec: FeatureSpec,
    user_ids: Iterable[str],
    item_ids: Iterable[str],
    user_features: Mapping[str, Sequence[Any]],
    item_features: Mapping[str, Sequence[Any]],
) -> Vocabularies:
    """Vocabularies from the training split: callers pass only ids and feature rows seen in training."""
    features: dict[str, Vocabulary] = {}
    for defs, columns in ((spec.user_features, user_features), (spec.item_features, item_features)):
        for feature in defs:
            seen = {tok for raw in columns.get(feature.name, ()) for tok in feature.tokens(raw)}
            features[feature.name] = Vocabulary(sorted(seen))
    return Vocabularies(
        user_ids=Vocabulary(sorted(set(map(str, user_ids)))),
        item_ids=Vocabulary(sorted(set(map(str, item_ids)))),
        features=features,
    )


@dataclass
class EncodedUsers:
    """Index arrays for a batch of users: ids (B,), one (B, width) array per feature, history (B, L)."""

    ids: np.ndarray
    features: dict[str, np.ndarray]
    history: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodedItems:
    """Index arrays for a batch of items: ids (N,) and one (N, width) array per feature."""

    ids: np.ndarray
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)


def _encode_feature(feature: FeatureDef, vocab: Vocabulary, column: Sequence[Any] | None, n: int) -> np.ndarray:
    out = np.zeros((n, feature.width), dtype=np.int64)
    if column is None:
        return out
    if feature.kind == "multi":
        for row, raw in enumerate(column):
            idx = [vocab.lookup(t) for t in feature.tokens(raw)]
            out[row, : len(idx)] = idx
    else:
        out[:, 0] = vocab.lookup_many(t[0] if t else "" for t in map(feature.tokens, column))
    return out


def encode_users(
    spec: FeatureSpec,
    vocabs: Vocabularies,
    user_ids: Sequence[str | None],
    features: Mapping[str, Sequence[Any]],
    histories: Sequence[Sequence[str]],
) -> EncodedUsers:
    """Encode users column-wise. `features[name][i]` is user i's raw value (None when missing);
    `histories[i]` is user i's item ids newest first. Unknown anything maps to index 0."""
    n = len(user_ids)
    history = np.zeros((n, spec.max_history), dtype=np.int64)
    lookup = vocabs.item_ids.lookup_list
    for row, items in enumerate(histories):
        idx = lookup(items[: spec.max_history])
        history[row, : len(idx)] = idx
    return EncodedUsers(
        ids=vocabs.user_ids.lookup_many("" if u is None else str(u) for u in user_ids),
        features={
            f.name: _encode_feature(f, vocabs.features[f.name], features.get(f.name), n) for f in spec.user_features
        },
        history=history,
    )


def encode_items(
    spec: FeatureSpec,
    vocabs: Vocabularies,
    item_ids: Sequence[str],
    features: Mapping[str, Sequence[Any]],
) -> EncodedItems:
    """Encode items column-wise, like `encode_users`. Items new since training get the unknown id and are
    carried by their features."""
    n = len(item_ids)
    return EncodedItems(
        ids=vocabs.item_ids.lookup_many(str(i) for i in item_ids),
        features={
            f.name: _encode_feature(f, vocabs.features[f.name], features.get(f.name), n) for f in spec.item_features
        },
    )


def encode_item_frame(spec: FeatureSpec, vocabs: Vocabularies, items: pd.DataFrame) -> EncodedItems:
    """`encode_items` for a table indexed by item id whose columns are raw item features (a feature without a
    column encodes as unknown)."""
    columns = {f.name: items[f.name].tolist() for f in spec.item_features if f.name in items.columns}
    return encode_items(spec, vocabs, [str(i) for i in items.index], columns)


def encode_user_frame(
    spec: FeatureSpec,
    vocabs: Vocabularies,
    users: pd.DataFrame,
    histories: Sequence[Sequence[str]] | None = None,
) -> EncodedUsers:
    """`encode_users` for a table indexed by user id whose columns are raw user features. Histories (item ids,
    newest first) are `histories` when given, else the table's `history` column (a users table of a model
    artifact), else empty."""
    if histories is None:
        column = users["history"] if "history" in users.columns else [None] * len(users)
        histories = [[str(i) for i in h] if isinstance(h, list | tuple | np.ndarray) else [] for h in column]
    columns = {f.name: users[f.name].tolist() for f in spec.user_features if f.name in users.columns}
    return encode_users(spec, vocabs, [str(u) for u in users.index], columns, histories)
