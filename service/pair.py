"""A serving pair: a model and the index built from its item tower, loaded, checked against each other, and
what serving needs of them prepared once (the numpy user tower, the cold user's vector, the filterable item
attributes).

`load_pair(artifacts, index_version)` reads the index, then the model version its manifest names, and refuses the
pair (`ArtifactError`, `VersionMismatchError`, naming both versions) unless they belong together: the manifests
agree, the dimensions agree, and a sample of the index's vectors equals this model's item tower run on those
items' features (DESIGN §6, "version drift"). Used by `service.retriever`, which swaps pairs; nothing here
serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from service.errors import InvalidInputError
from training.artifacts import (
    INDEX_ITEMS,
    MANIFEST,
    ArtifactError,
    ArtifactStore,
    LoadedModel,
    VersionMismatchError,
    check_version,
    load_model,
)
from training.features import EncodedUsers, encode_item_frame, encode_users
from training.index import ItemIndex, load_index
from training.model import NumpyUserTower, embed_items, embed_users

log = logging.getLogger(__name__)

# Items re-embedded at load to check that the index vectors are this model's item-tower outputs.
PARITY_SAMPLE = 16
PARITY_ATOL = 1e-4


class ItemAttributes:
    """Inverted lists over index positions, for attribute filters: attribute -> value -> sorted positions.

    Values are compared as strings; list-valued attributes (genres) match when any of their values match."""

    def __init__(self, n_items: int, postings: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.n_items = n_items
        self.postings = {name: dict(values) for name, values in postings.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self.postings)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, item_ids: Sequence[str], columns: Sequence[str]) -> ItemAttributes:
        """Attributes of the index's items (positions = order of `item_ids`) from a table indexed by item id."""
        table = frame.reindex(pd.Index(item_ids, dtype=object))
        postings: dict[str, dict[str, np.ndarray]] = {}
        for name in columns:
            if name not in table.columns:
                continue
            column = table[name].reset_index(drop=True)
            if pd.api.types.is_float_dtype(column) and ((column.dropna() % 1) == 0).all():
                column = column.astype("Int64")  # a year column with gaps still filters as "1999", not "1999.0"
            values = column.explode().dropna()
            if values.empty:
                postings[name] = {}
                continue
            positions = values.index.to_numpy(dtype=np.int64)
            codes, uniques = pd.factorize(values.astype(str).to_numpy())
            order = np.argsort(codes, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(uniques)))])
            postings[name] = {
                str(value): np.unique(positions[order[bounds[i] : bounds[i + 1]]]) for i, value in enumerate(uniques)
            }
        return cls(len(item_ids), postings)

    def mask(self, conditions: Mapping[str, Collection[str]]) -> np.ndarray:
        """(N,) bool: items that match, for every attribute, at least one of its listed values."""
        out = np.ones(self.n_items, dtype=bool)
        for name, wanted in conditions.items():
            values = self.postings.get(name)
            if values is None:
                raise InvalidInputError(
                    f"unknown item attribute {name!r}; filterable attributes are {self.names}", ("filter", name), name
                )
            hit = np.zeros(self.n_items, dtype=bool)
            for value in wanted:
                positions = values.get(str(value))
                if positions is not None:
                    hit[positions] = True
            out &= hit
        return out


@dataclass(frozen=True)
class ServingPair:
    """A verified model + the index built from that model's item tower: what one request is served from."""

    model: LoadedModel
    index: ItemIndex
    index_version: str
    index_manifest: Mapping[str, Any]
    attributes: ItemAttributes
    loaded_at: float
    # The user tower as served: `training.model.NumpyUserTower` (the default), or the torch module itself.
    user_tower: Callable[[EncodedUsers], np.ndarray]
    # The tower's output for a user it knows nothing of (no features, no history, no known id).
    cold_vector: np.ndarray

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def search_p50_us(self) -> float | None:
        """One query's median search time as the index build measured it (None when it was not measured)."""
        value = self.index_manifest.get("latency", {}).get("p50_us")
        return float(value) if value is not None else None

    @property
    def user_feature_names(self) -> list[str]:
        return [f.name for f in self.model.model.spec.user_features]

    def embed(
        self, user_ids: Sequence[str | None], features: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """(B, D) user vectors: the SAME encoding training used (`training.features.encode_users`), then the
        served user tower."""
        model = self.model.model
        encoded: EncodedUsers = encode_users(
            model.spec,
            model.vocabs,
            list(user_ids),
            {name: [f.get(name) for f in features] for name in self.user_feature_names},
            [list(h) for h in histories],
        )
        return self.user_tower(encoded)


def load_pair(
    artifacts: ArtifactStore, index_version: str, user_tower: Literal["numpy", "torch"] = "numpy"
) -> ServingPair:
    """Load index `index_version` and the model it was built from, check that they belong together, and prepare
    them for serving; `ArtifactError` (or `VersionMismatchError`) naming the versions when they are refused."""
    index_dir = artifacts.index_dir(check_version(index_version, "index version"))
    if not index_dir.is_dir():
        raise ArtifactError(f"index {index_version} does not exist: no directory {index_dir}")
    index, manifest = load_index(index_dir)
    model_version = check_version(str(manifest.get("model_version")), f"model named by index {index_version}")
    model_dir = artifacts.model_dir(model_version)
    if not model_dir.is_dir():
        raise ArtifactError(f"index {index_version} was built from model {model_version}; {model_dir} is missing")
    model = load_model(model_dir)
    if model.version != index.model_version:
        raise VersionMismatchError(
            f"index {index_version} was built from model {index.model_version} but {model_dir} holds model "
            f"{model.version}; refusing to pair them"
        )
    if model.dim != index.dim:
        raise VersionMismatchError(
            f"{index_dir / MANIFEST} says dim {index.dim}, but model {model.version} embeds in dim {model.dim}"
        )
    items = _item_table(index_dir, model)
    _check_vectors_match_towers(model, index, items, index_version)
    columns = [f.name for f in model.model.spec.item_features]
    attributes = ItemAttributes.from_frame(items, index.item_ids, columns)
    index.positions_of([])  # builds the id -> position map now rather than on the first request
    model.model.eval()  # once, here: serving never trains
    tower: Callable[[EncodedUsers], np.ndarray] = (
        NumpyUserTower(model.model.user_tower) if user_tower == "numpy" else partial(embed_users, model.model)
    )
    spec, vocabs = model.model.spec, model.model.vocabs
    cold = tower(encode_users(spec, vocabs, [None], {}, [[]]))[0]
    if not np.isfinite(cold).all():
        raise ArtifactError(f"model {model.version}: the user tower gives non-finite vectors ({model_dir})")
    return ServingPair(model, index, index_version, manifest, attributes, time.time(), tower, cold)


def _item_table(index_dir: Path, model: LoadedModel) -> pd.DataFrame:
    """The raw catalog the index embedded: the re-index job's copy if present, else the model's catalog."""
    path = index_dir / INDEX_ITEMS
    try:
        table = pd.read_parquet(path) if path.is_file() else model.catalog().reset_index()
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read the item table of {index_dir}: {e}") from e
    if "item_id" in table.columns:
        table = table.set_index("item_id")
    table.index = table.index.astype(str)
    return table


def _check_vectors_match_towers(model: LoadedModel, index: ItemIndex, items: pd.DataFrame, index_version: str) -> None:
    """Re-embed a few catalog items with this model's item tower and compare them with the index's vectors.

    Manifests can be copied, renamed or hand-edited; this catches an index whose vectors come from another item
    tower (the silent "version drift" of DESIGN §6), at the cost of one small forward pass per load."""
    spec = model.model.spec
    if any(f.name not in items.columns for f in spec.item_features):
        log.warning("index %s: item table lacks some item features; skipping the tower parity check", index_version)
        return
    step = max(1, len(index) // PARITY_SAMPLE)
    sample = [i for i in range(0, len(index), step) if index.item_ids[i] in items.index][:PARITY_SAMPLE]
    if not sample:
        return
    rows = items.loc[[index.item_ids[i] for i in sample]]
    expected = embed_items(model.model, encode_item_frame(spec, model.model.vocabs, rows))  # (S, D)
    actual = np.asarray(index.item_vectors[np.asarray(sample)], dtype=np.float32)  # (S, D)
    error = float(np.abs(expected - actual).max())
    if not error <= PARITY_ATOL:  # NaN compares false both ways: a non-finite vector is no match
        raise VersionMismatchError(
            f"index {index_version} says it was built from model {model.version}, but its item vectors differ from "
            f"that model's item tower by up to {error:.3g} (tolerance {PARITY_ATOL}); it was built from another model"
        )
