"""The catalog the re-index job embeds: an items table read, checked against a model's item features, normalized
and hashed.

`normalize_catalog` refuses (`CatalogError`, naming the source, the column and the rows) what would embed wrongly
or not at all: missing, NaN or duplicate ids, a feature column the item tower needs that is absent, a list where
one value is expected and the reverse, a non-numeric value in a numeric feature. Cells are read by
`training.tables`, the same reader as the training tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.features import FeatureDef, FeatureSpec
from training.tables import DataFormatError, id_strings, is_list, is_missing, multi_values, read_table

ID_COLUMNS = ("item_id", "item")

_SHOWN = 5  # offending ids/rows quoted in an error message


class CatalogError(ValueError):
    """The catalog to index is malformed; the message names the problem (source, column, ids or rows)."""


def read_catalog(path: str | Path) -> pd.DataFrame:
    """An items table from a `.parquet` or `.csv` file, as read (validation is `normalize_catalog`'s job);
    read by the same reader as the training tables (`training.tables.read_table`)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist")
    try:
        return read_table(path).frame.reset_index(drop=True)
    except DataFormatError as e:
        raise CatalogError(str(e)) from e


def _rows(positions: Sequence[int] | np.ndarray) -> str:
    shown = ", ".join(str(int(p) + 1) for p in positions[:_SHOWN])
    more = f" and {len(positions) - _SHOWN} more" if len(positions) > _SHOWN else ""
    return f"row{'s' if len(positions) > 1 else ''} {shown}{more}"


def _item_ids(frame: pd.DataFrame, source: str) -> tuple[pd.Index, pd.DataFrame]:
    """(str ids, the other columns) from an `item_id` (or `item`) column, else an index of that name."""
    column = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if column is not None:
        raw, rest = frame[column], frame.drop(columns=[column])
    elif frame.index.name in ID_COLUMNS:
        raw, rest = frame.index.to_series(), frame
    else:
        raise CatalogError(
            f"{source}: no item id column: expected 'item_id' (or 'item'); found columns {[str(c) for c in frame]}"
        )
    values = list(raw)
    missing = [i for i, v in enumerate(values) if is_missing(v) or (isinstance(v, str) and v.strip() == "")]
    if missing:
        raise CatalogError(f"{source}: item_id is missing (empty, NaN or None) in {_rows(missing)}")
    if any(is_list(v) for v in values):
        bad = [i for i, v in enumerate(values) if is_list(v)]
        raise CatalogError(f"{source}: item_id must be a single value, found a list in {_rows(bad)}")
    index = pd.Index(id_strings(pd.Series(values, dtype=object)).to_numpy(dtype=object), dtype=object, name="item_id")
    if not index.is_unique:
        counts = index.value_counts()
        duplicated = counts[counts > 1]
        shown = ", ".join(f"{item!r} ({n}x)" for item, n in duplicated.head(_SHOWN).items())
        raise CatalogError(
            f"{source}: {len(duplicated)} duplicate item id{'s' if len(duplicated) > 1 else ''}: {shown}"
            + (" ..." if len(duplicated) > _SHOWN else "")
            + "; each item must appear once"
        )
    return index, rest.reset_index(drop=True)


def _multi_values(value: Any) -> list[str] | None:
    """A multi-valued cell's values (`training.data.multi_values`); None when the cell is not list-like."""
    if is_list(value):
        return multi_values(value) if np.ndim(value) == 1 else None
    return multi_values(value) if isinstance(value, str) or is_missing(value) else None


def _normalize_feature(feature: FeatureDef, column: pd.Series, source: str) -> list[Any] | pd.Series:
    """One feature column in a canonical form that gives the same tokens as the raw values and survives a
    Parquet round trip unchanged (the service re-encodes `items.parquet` and must get the same vectors)."""
    values = list(column)
    name = feature.name
    if feature.kind == "multi":
        lists = [_multi_values(v) for v in values]
        bad = [i for i, v in enumerate(lists) if v is None]
        if bad:
            raise CatalogError(
                f"{source}: column {name!r} is multi-valued: expected a list (Parquet) or a '|'-separated string "
                f"(CSV), found {type(values[bad[0]]).__name__} {values[bad[0]]!r} in {_rows(bad)}"
            )
        return lists
    bad = [i for i, v in enumerate(values) if is_list(v)]
    if bad:
        raise CatalogError(
            f"{source}: column {name!r} takes one value per item, found a list {values[bad[0]]!r} in {_rows(bad)}"
        )
    if feature.kind == "bucket":
        numbers = pd.to_numeric(column, errors="coerce")
        missing_before = np.array([is_missing(v) or (isinstance(v, str) and v.strip() == "") for v in values])
        bad_numbers = np.flatnonzero(numbers.isna().to_numpy() & ~missing_before)
        if len(bad_numbers):
            raise CatalogError(
                f"{source}: column {name!r} is numeric: found {values[bad_numbers[0]]!r} in {_rows(bad_numbers)}"
            )
        return numbers.astype(np.float64)
    # Categorical and prefix features: the very text `FeatureDef.tokens` derives from the raw value.
    return [None if is_missing(v) else str(v).strip() or None for v in values]


def normalize_catalog(frame: pd.DataFrame, spec: FeatureSpec, source: str = "catalog") -> pd.DataFrame:
    """Validate a catalog against the model's item features and return it normalized: a str `item_id` index,
    multi-valued features as lists of str, numeric (bucket) features as float, other features as str or None.
    Columns the model does not use are kept as they are (the service filters on them).

    Raises `CatalogError` naming the source and the problem: no or missing/NaN/duplicate ids, a feature column
    the model needs is absent, a multi-valued cell that is not a list, a list where one value is expected, a
    non-numeric value in a numeric feature, an empty catalog."""
    if len(frame) == 0:
        raise CatalogError(f"{source}: the catalog is empty; an index needs at least one item")
    index, rest = _item_ids(frame, source)
    missing = [f.name for f in spec.item_features if f.name not in rest.columns]
    if missing:
        raise CatalogError(
            f"{source}: missing feature column{'s' if len(missing) > 1 else ''} {missing} that the model's item "
            f"tower needs; found columns {[str(c) for c in rest.columns]}"
        )
    columns: dict[str, Any] = {str(c): rest[c] for c in rest.columns}  # rest has a RangeIndex: no realignment
    for feature in spec.item_features:
        columns[feature.name] = _normalize_feature(feature, rest[feature.name], source)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(index))).set_axis(index, axis=0)


def _canonical(value: Any) -> str:
    if is_list(value):
        return "[" + "\x1f".join(map(str, value)) + "]"
    if is_missing(value):
        return "\x00"
    return str(value)


def catalog_sha256(catalog: pd.DataFrame) -> str:
    """Content hash of a normalized catalog: ids in order, then every column by name, value by value.

    The same items in the same order hash the same whether they came from CSV, Parquet or a DataFrame."""
    digest = hashlib.sha256()
    digest.update("\x1e".join(map(str, catalog.index)).encode())
    for name in sorted(map(str, catalog.columns)):
        digest.update(f"\x1d{name}\x1d".encode())
        digest.update("\x1e".join(map(_canonical, catalog[name])).encode())
    return digest.hexdigest()
