"""Tables as users bring them: the readers that report a malformed file by file:line:column, the reading of
cells (missing values, multi-valued cells, ids), feature inference, and the generic interactions format.

Shared by every loader (`training.movielens`, the generic format below) and by the re-index job's catalog
checks (`training.catalog`), so a cell is read one way everywhere. The generic format: `interactions.csv|parquet`
(user, item, optional timestamp and weight) with optional `users.*` / `items.*` feature tables beside it.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.dataset import Dataset, bare_table, cover_ids, make_interactions
from training.features import FeatureDef, FeatureSpec

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """An input file is malformed; the message names the file, line and column."""


# --------------------------------------------------------------------------- parsing with located errors


def read_delimited(
    path: Path,
    sep: str,
    columns: Sequence[tuple[str, Callable[[str], Any]]],
    encoding: str = "utf-8",
    min_fields: int | None = None,
    skip_header: bool = False,
    max_fields: int | None = None,
) -> pd.DataFrame:
    """Parse a small delimited file line by line; a bad field raises `DataFormatError` naming
    file:line:column.

    `columns` gives (name, converter) for the leading fields; extra fields are ignored unless `max_fields`
    caps them. Blank lines are skipped (and counted in the log)."""
    need = min_fields if min_fields is not None else len(columns)
    values: list[list[Any]] = [[] for _ in columns]
    blank = 0
    with path.open(encoding=encoding, newline="") as handle:
        for lineno, line in enumerate(handle, start=1):
            if skip_header and lineno == 1:
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                blank += 1
                continue
            fields = line.split(sep)
            if len(fields) < need:
                raise DataFormatError(
                    f"{path}:{lineno}: expected at least {need} fields separated by {sep!r}, found {len(fields)}"
                )
            if max_fields is not None and len(fields) > max_fields:
                raise DataFormatError(
                    f"{path}:{lineno}:{max_fields + 1}: expected at most {max_fields} fields separated by "
                    f"{sep!r}, found {len(fields)}"
                )
            for col, ((name, convert), raw) in enumerate(zip(columns, fields, strict=False), start=1):
                try:
                    values[col - 1].append(convert(raw))
                except (TypeError, ValueError) as e:
                    raise DataFormatError(f"{path}:{lineno}:{col}: bad value {raw!r} for column {name!r}: {e}") from e
    if blank:
        log.info("%s: skipped %d blank lines", path, blank)
    return pd.DataFrame({name: vals for (name, _), vals in zip(columns, values, strict=True)})


def decode_error(path: Path, encoding: str, error: UnicodeDecodeError) -> DataFormatError:
    """Locate the first line that isn't valid `encoding` (the decoder only knows an offset in a buffer)."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                return DataFormatError(
                    f"{path}:{lineno}: byte {e.start + 1} ({raw[e.start]:#04x}) of the line is not valid {encoding}"
                )
    return DataFormatError(f"{path}: not valid {encoding}: {error}")


def nonblank_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; blank lines are counted in the log."""
    blank = 0
    with path.open(encoding=encoding, newline="") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line
            else:
                blank += 1
    if blank:
        log.info("%s: skipped %d blank lines", path, blank)


def drop_duplicate_ids(table: pd.DataFrame, source: Path) -> pd.DataFrame:
    duplicated = table.index.duplicated(keep="first")
    if duplicated.any():
        log.warning(
            "%s: dropped %d rows whose %s repeats an earlier row (kept the first), e.g. %r",
            source,
            int(duplicated.sum()),
            table.index.name,
            table.index[duplicated][0],
        )
    return table[~duplicated]


# --------------------------------------------------------------------------- the generic format

TABLE_SUFFIXES = (".csv", ".parquet")
MAX_MULTI_VALUES = 32  # a wider multi-valued column is truncated by the encoder (and the loader says so)
_YEAR_NAME = re.compile(r"(^|_)year(_|$)")


def _csv_record_line(path: Path, record: int) -> int:
    """The line where data record `record` starts (0-based after the header, blank lines counted as records,
    as pandas does with skip_blank_lines=False); quoted fields may span lines."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        start = 1
        for k, _ in enumerate(reader):
            if k == record + 1:
                return start
            start = reader.line_num + 1
    return start


@dataclass
class _Table:
    """A CSV or Parquet table whose rows know where they came from. The frame's index is the record number
    (0 = first row after a CSV header); CSV values are str or NaN."""

    path: Path
    frame: pd.DataFrame

    def where(self, record: int, column: str) -> str:
        if self.path.suffix.lower() == ".parquet":
            return f"{self.path}: row {record + 1}, column {column!r}"
        number = list(self.frame.columns).index(column) + 1
        return f"{self.path}:{_csv_record_line(self.path, record)}:{number}: column {column!r}"

    def fail_first(self, bad: pd.Series | np.ndarray, column: str, expected: str) -> None:
        """Raise `DataFormatError` at the first row flagged in `bad`, if any."""
        flags = np.asarray(bad, dtype=bool)
        if flags.any():
            pos = int(np.argmax(flags))
            value = self.frame[column].iloc[pos]
            found = "nothing" if is_missing(value) else repr(value)
            where = self.where(int(self.frame.index[pos]), column)
            raise DataFormatError(f"{where}: expected {expected}, found {found}")

    def require(self, names: Sequence[str]) -> str:
        """The first of `names` that is a column; else an error naming the file and the column."""
        for name in names:
            if name in self.frame.columns:
                return name
        line = "" if self.path.suffix.lower() == ".parquet" else ":1"
        others = " or ".join(repr(n) for n in names[1:])
        raise DataFormatError(
            f"{self.path}{line}: missing column {names[0]!r}"
            + (f" (or {others})" if others else "")
            + f"; found columns {[str(c) for c in self.frame.columns]}"
        )


def is_missing(value: Any) -> bool:
    """None, NA, NaT or a float NaN: a cell with no value (shared with the re-index job's catalog checks)."""
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value)


def _csv_shape_error(path: Path, error: Exception) -> DataFormatError:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        width = len(next(reader, []))
        start = reader.line_num + 1
        for fields in reader:
            lineno, start = start, reader.line_num + 1
            if fields and len(fields) != width:
                return DataFormatError(
                    f"{path}:{lineno}: expected {width} fields as in the header, found {len(fields)}"
                )
    return DataFormatError(f"{path}: {error}")


def read_table(path: Path) -> _Table:
    """A `.csv` or `.parquet` table as read: CSV cells as text (empty = missing, so "007" stays "007"), blank
    lines skipped and counted, a row of the wrong width reported by file and line (`DataFormatError`); a Parquet
    table written with its id as the index gets it back as a column. Shared with the re-index job's catalogs."""
    if path.suffix.lower() == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataFormatError(f"{path}: not a readable Parquet file: {e}") from e
        if frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex):
            frame = frame.reset_index()  # a table written with its id as the index
        return _Table(path, frame.reset_index(drop=True))
    if path.suffix.lower() != ".csv":
        raise DataFormatError(f"{path}: expected a .csv or .parquet file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                skip_blank_lines=False,
                index_col=False,
                encoding="utf-8",
            )
    except UnicodeDecodeError as e:
        raise decode_error(path, "utf-8", e) from e
    except pd.errors.EmptyDataError as e:
        raise DataFormatError(f"{path}: empty file, expected a header line") from e
    except (ValueError, Warning) as e:  # too many or too few fields somewhere
        raise _csv_shape_error(path, e) from e
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        log.info("%s: skipped %d blank lines", path, int(blank.sum()))
        frame = frame[~blank]  # keep the record numbers as the index, for error messages
    return _Table(path, frame)


def id_strings(values: pd.Series) -> pd.Series:
    """Ids (no missing ones) as text. Integer ids stored as floats (a Parquet column written from floats, an
    integer column with gaps) read "7", not "7.0"; text stays as it is ("007")."""
    if pd.api.types.is_float_dtype(values):
        if (values == np.floor(values)).all():
            values = values.astype(np.int64)
    elif values.dtype == object and pd.api.types.infer_dtype(values, skipna=False) != "string":
        values = values.map(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)
    return values.astype(str)


def _table_ids(table: _Table, column: str) -> pd.Series:
    values = table.frame[column]
    table.fail_first(values.isna(), column, "an id")
    return id_strings(values)


def _table_timestamps(table: _Table, column: str) -> np.ndarray:
    """Unix seconds from integer timestamps or ISO 8601 dates (datetimes without a zone are taken as UTC)."""
    values = table.frame[column]
    if not pd.api.types.is_datetime64_any_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
        if numbers.notna().any() or values.isna().all():
            table.fail_first(~np.isfinite(numbers.to_numpy()), column, "a unix timestamp or an ISO 8601 date")
            return np.floor(numbers.to_numpy()).astype(np.int64)
        values = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    table.fail_first(values.isna(), column, "an ISO 8601 date or a unix timestamp")
    dates = pd.to_datetime(values, utc=True)
    return ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _table_weights(table: _Table, column: str) -> np.ndarray:
    numbers = pd.to_numeric(table.frame[column], errors="coerce").astype(np.float64).to_numpy()
    table.fail_first(~np.isfinite(numbers), column, "a number")
    return numbers.astype(np.float32)


def is_list(value: Any) -> bool:
    """A cell holding several values (a Parquet list column reads as numpy arrays)."""
    return isinstance(value, list | tuple | np.ndarray)


def multi_values(raw: Any) -> list[str]:
    """A multi-valued cell as its values: a list as it is, a '|'-separated string (CSV) split; missing and
    empty values dropped. The one reading of such cells, for training tables and the re-index job's catalogs."""
    if is_list(raw):
        return [str(v) for v in raw if not is_missing(v) and str(v) != ""]
    if is_missing(raw):
        return []
    return [v for v in (part.strip() for part in str(raw).split("|")) if v]


def _as_text(raw: Any) -> str | None:
    if is_missing(raw):
        return None
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))  # an integer column with gaps reads as floats
    return str(raw)


def _infer_feature(name: str, column: pd.Series, source: Path) -> tuple[FeatureDef | None, list[Any]]:
    """How a feature-table column becomes a feature, and its values normalized for that kind.

    Lists, or strings containing "|", are multi-valued (lists of str); numbers in a column named like "year"
    are bucketed by decade; everything else is categorical (str). A column without values, or a text column
    whose every value is distinct (a title, an email: nothing to generalize from) is kept but not used."""
    present = [v for v in column if isinstance(v, list | tuple | np.ndarray) or not is_missing(v)]
    if not present:
        log.info("%s: column %r has no values; not used as a feature", source, name)
        return None, list(column)
    if any(isinstance(v, list | tuple | np.ndarray) or (isinstance(v, str) and "|" in v) for v in present):
        lists = [multi_values(v) for v in column]
        width = max(1, *(len(v) for v in lists))
        return FeatureDef(name, "multi", max_values=min(width, MAX_MULTI_VALUES)), lists
    numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
    if _YEAR_NAME.search(name.lower()) and numbers.notna().sum() == len(present):
        low, high = int(numbers.min()) // 10 * 10, int(numbers.max()) // 10 * 10
        boundaries = tuple(float(y) for y in range(low + 10, high + 10, 10))
        return FeatureDef(name, "bucket", boundaries=boundaries), list(numbers)
    texts = [_as_text(v) for v in column]
    distinct = len({t for t in texts if t is not None})
    if len(present) >= 100 and distinct == len(present) and numbers.notna().sum() == 0:
        log.info("%s: column %r has a distinct value in every row; not used as a feature", source, name)
        return None, texts
    return FeatureDef(name), texts


def _read_feature_table(path: Path, id_columns: Sequence[str]) -> tuple[pd.DataFrame, list[FeatureDef]]:
    """A users or items table: indexed by `id_columns[0]` (str ids), one normalized column per feature."""
    table = read_table(path)
    id_column = table.require(id_columns)
    index = pd.Index(_table_ids(table, id_column).to_numpy(dtype=object), name=id_columns[0], dtype=object)
    raw = table.frame.drop(columns=[id_column]).set_axis(index, axis=0)
    raw = drop_duplicate_ids(raw, path)
    features: list[FeatureDef] = []
    columns: dict[str, list[Any]] = {}
    for name in raw.columns:
        feature, values = _infer_feature(str(name), raw[name], path)
        columns[str(name)] = values
        if feature is not None:
            features.append(feature)
    return pd.DataFrame(columns, index=raw.index), features


def _beside(folder: Path, stem: str) -> Path | None:
    """`folder/stem.csv` or `folder/stem.parquet`; both at once is ambiguous."""
    found = [folder / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise DataFormatError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


def load_interactions(path: Path) -> Dataset:
    """Generic tables: `interactions.csv|parquet` in a folder (or any .csv/.parquet file given directly)
    with columns user_id (or user), item_id (or item), optional timestamp (unix seconds or ISO 8601; without
    it, row order) and optional weight; optional `users.csv|parquet` (user_id + feature columns) and
    `items.csv|parquet` (item_id + feature columns) beside it. The feature spec is inferred from those
    tables (see `_infer_feature`)."""
    source = path if path.is_file() else _beside(path, "interactions")
    if source is None:
        raise DataFormatError(f"{path}: no interactions.csv or interactions.parquet")
    table = read_table(source)
    user_column = table.require(("user_id", "user"))
    item_column = table.require(("item_id", "item"))
    users_ids, item_ids = _table_ids(table, user_column), _table_ids(table, item_column)
    timestamps = weights = None
    if "timestamp" in table.frame.columns:
        timestamps = _table_timestamps(table, "timestamp")
    else:
        log.info("%s: no timestamp column; events are ordered by row", source)
    if "weight" in table.frame.columns:
        weights = _table_weights(table, "weight")
    used = (user_column, item_column, "timestamp", "weight")
    ignored = [str(c) for c in table.frame.columns if c not in used]
    if ignored:
        log.info("%s: ignored columns %s", source, ignored)
    if table.frame.empty:
        raise DataFormatError(f"{source}: no interactions")
    interactions = make_interactions(users_ids, item_ids, timestamps, weights, source=source)

    tables: dict[str, _FeatureTable | None] = {}
    for kind in ("user", "item"):
        side = _beside(source.parent, f"{kind}s")
        tables[kind] = (*_read_feature_table(side, (f"{kind}_id", kind)), side) if side is not None else None
    _rename_shared_feature_names(tables)

    def described(kind: str) -> tuple[pd.DataFrame, tuple[FeatureDef, ...]]:
        ids = interactions[f"{kind}_id"]
        entry = tables[kind]
        if entry is None:
            return bare_table(ids, f"{kind}_id"), ()
        frame, features, side = entry
        frame = cover_ids(frame, ids, [f.name for f in features if f.kind == "multi"], side)
        return frame, tuple(features)

    users, user_features = described("user")
    items, item_features = described("item")
    name = source.parent.name if path.is_dir() else source.stem
    return Dataset(name, interactions, users, items, FeatureSpec(user_features, item_features))


_FeatureTable = tuple[pd.DataFrame, list[FeatureDef], Path]


def _rename_shared_feature_names(tables: dict[str, _FeatureTable | None]) -> None:
    """Vocabularies are keyed by feature name: a name both tables use becomes user_<name> and item_<name>."""
    user, item = tables["user"], tables["item"]
    if user is None or item is None:
        return
    shared = {f.name for f in user[1]} & {f.name for f in item[1]}
    if not shared:
        return
    for kind, (frame, features, side) in (("user", user), ("item", item)):
        names = {name: f"{kind}_{name}" for name in sorted(shared)}
        log.info("%s: features renamed %s (both tables have them)", side, names)
        tables[kind] = (
            frame.rename(columns=names),
            [FeatureDef.from_dict({**f.to_dict(), "name": names.get(f.name, f.name)}) for f in features],
            side,
        )
