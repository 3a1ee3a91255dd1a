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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from training.dataset import (
    Dataset,
    Interactions,
    build_dataset,
    interactions_from_codes,
    make_interactions,
    sorted_codes,
)
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
# Rows per chunk of a streamed interactions file, and bytes per CSV read block: the memory of a read is a few
# chunks, whatever the file's size.
STREAM_ROWS = 1 << 20
STREAM_BLOCK_BYTES = 1 << 26
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


def timestamp_seconds(values: pd.Series) -> tuple[np.ndarray, np.ndarray, str]:
    """Unix seconds from integer timestamps or ISO 8601 dates (datetimes without a zone are taken as UTC):
    (seconds, a mask of the values that are neither, what was expected of them)."""
    if not pd.api.types.is_datetime64_any_dtype(values):
        numbers = pd.to_numeric(values, errors="coerce").astype(np.float64).to_numpy()
        if np.isfinite(numbers).any() or values.isna().all():
            bad = ~np.isfinite(numbers)
            return np.floor(np.where(bad, 0, numbers)).astype(np.int64), bad, "a unix timestamp or an ISO 8601 date"
        values = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    bad = values.isna().to_numpy()
    dates = pd.to_datetime(values, utc=True).fillna(pd.Timestamp(0, tz="UTC"))
    seconds = ((dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    return seconds, bad, "an ISO 8601 date or a unix timestamp"


def weight_values(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float32 weights, a mask of the values that are not finite numbers)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64).to_numpy()
    bad = ~np.isfinite(numbers)
    return np.where(bad, 0, numbers).astype(np.float32), bad


def _table_timestamps(table: _Table, column: str) -> np.ndarray:
    seconds, bad, expected = timestamp_seconds(table.frame[column])
    table.fail_first(bad, column, expected)
    return seconds


def _table_weights(table: _Table, column: str) -> np.ndarray:
    weights, bad = weight_values(table.frame[column])
    table.fail_first(bad, column, "a number")
    return weights


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


def _texts(column: pd.Series) -> list[str | None]:
    """The column's values as text (None where missing); an integer column with gaps reads "7", not "7.0"."""
    present = column.notna().to_numpy()
    if pd.api.types.is_float_dtype(column) and (column[present] % 1 == 0).all():
        column = column.astype("Int64")
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.infer_dtype(column, skipna=True) == "string":
        values = column.astype(object).astype(str).to_numpy(dtype=object)
        values[~present] = None
        return list(values)
    return [_as_text(v) for v in column]


def _infer_feature(name: str, column: pd.Series, source: Path) -> tuple[FeatureDef | None, list[Any]]:
    """How a feature-table column becomes a feature, and its values normalized for that kind.

    Lists, or strings containing "|", are multi-valued (lists of str); numbers in a column named like "year"
    are bucketed by decade; everything else is categorical (str). A column without values, or a text column
    whose every value is distinct (a title, an email: nothing to generalize from) is kept but not used."""
    textual = column.dtype == object or pd.api.types.is_string_dtype(column)
    listish = column.map(is_list).to_numpy(dtype=bool) if column.dtype == object else np.zeros(len(column), bool)
    present = listish | column.notna().to_numpy()
    n_present = int(present.sum())
    if not n_present:
        log.info("%s: column %r has no values; not used as a feature", source, name)
        return None, list(column)
    plain = column[~listish & present]
    texts_with_bars = textual and bool(plain.astype(str).str.contains("|", regex=False).any())
    if listish.any() or texts_with_bars:
        lists = [multi_values(v) for v in column]
        width = max(1, *(len(v) for v in lists))
        return FeatureDef(name, "multi", max_values=min(width, MAX_MULTI_VALUES)), lists
    numbers = pd.to_numeric(column, errors="coerce").astype(np.float64)
    if _YEAR_NAME.search(name.lower()) and numbers.notna().sum() == n_present:
        low, high = int(numbers.min()) // 10 * 10, int(numbers.max()) // 10 * 10
        boundaries = tuple(float(y) for y in range(low + 10, high + 10, 10))
        return FeatureDef(name, "bucket", boundaries=boundaries), list(numbers)
    texts = _texts(column)
    distinct = pd.Series(texts, dtype=object).nunique(dropna=True)
    if n_present >= 100 and distinct == n_present and numbers.notna().sum() == 0:
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


class _NotStreamable(Exception):
    """The streaming reader met something it does not report by file, line and column: re-read to locate it."""


class IdEncoder:
    """Ids of a streamed column, chunk by chunk, then as int32 codes with the distinct ids as str: integer ids are
    hashed once at the end (`pd.factorize`), text ids dictionary-encoded per chunk and the chunks' dictionaries
    unified (pyarrow), so no per-row (or per-distinct-id) Python object is made."""

    def __init__(self) -> None:
        self._numbers: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._dictionaries: list[pa.Array] = []

    def add(self, column: pa.Array | pa.ChunkedArray) -> None:
        if column.null_count:
            raise _NotStreamable("a missing id")
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_floating(column.type):
            values = column.to_numpy()
            if not (values == np.floor(values)).all():
                raise _NotStreamable("fractional ids")
            column = pa.array(values.astype(np.int64))  # ids stored as floats: "7", not "7.0"
        if pa.types.is_integer(column.type):
            self._numbers.append(column.to_numpy().astype(np.int64, copy=False))
            return
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())
        encoded = pc.dictionary_encode(column)
        if pc.any(pc.equal(pc.utf8_trim_whitespace(encoded.dictionary), "")).as_py():
            raise _NotStreamable("an empty id")
        self._indices.append(encoded.indices.to_numpy(zero_copy_only=False))
        self._dictionaries.append(encoded.dictionary)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(int32 codes of every row added, in first-seen order of the ids; the distinct ids as str)."""
        if self._numbers and self._indices:
            raise _NotStreamable("ids of several types")
        if self._numbers:
            codes, uniques = pd.factorize(np.concatenate(self._numbers))
            return codes.astype(np.int32), np.asarray(uniques.astype(str), dtype=object)
        if not self._indices:
            return np.zeros(0, np.int32), np.zeros(0, dtype=object)
        ids = pc.unique(pa.concat_arrays(self._dictionaries))
        parts = [
            pc.index_in(dictionary, value_set=ids).to_numpy().astype(np.int32)[indices]
            for dictionary, indices in zip(self._dictionaries, self._indices, strict=True)
        ]
        return np.concatenate(parts), np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)


def _batches(source: Path, wanted: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The source's `wanted` columns in record batches of about STREAM_ROWS rows (CSV cells as text)."""
    if source.suffix.lower() == ".parquet":
        yield from pq.ParquetFile(source).iter_batches(batch_size=STREAM_ROWS, columns=list(wanted))
        return
    header = _csv_header(source)
    names = {*header, *(f"\ufeff{name}" for name in header)}  # a byte-order mark stays on the first name
    reader = pa_csv.open_csv(
        source,
        read_options=pa_csv.ReadOptions(block_size=STREAM_BLOCK_BYTES),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            include_columns=list(wanted),
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    yield from reader


def _csv_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle), [])


def _columns(source: Path) -> list[str]:
    if source.suffix.lower() == ".parquet":
        return list(pq.ParquetFile(source).schema_arrow.names)
    return _csv_header(source)


def _stream_interactions(source: Path) -> Interactions:
    """The interactions table read in chunks (pyarrow) straight into codes: no per-row Python object, so a file of
    tens of millions of rows reads within a few GB. Raises `_NotStreamable` at anything it would have to locate."""
    columns = _columns(source)
    user_column = next((c for c in ("user_id", "user") if c in columns), None)
    item_column = next((c for c in ("item_id", "item") if c in columns), None)
    if user_column is None or item_column is None:
        raise _NotStreamable("a missing column")
    has_time, has_weight = "timestamp" in columns, "weight" in columns
    wanted = [user_column, item_column, *(["timestamp"] if has_time else []), *(["weight"] if has_weight else [])]
    ignored = [c for c in columns if c not in wanted]
    if ignored:
        log.info("%s: ignored columns %s", source, ignored)
    if not has_time:
        log.info("%s: no timestamp column; events are ordered by row", source)
    users, items = IdEncoder(), IdEncoder()
    times, weights = [], []
    try:
        for batch in _batches(source, wanted):
            users.add(batch.column(user_column))
            items.add(batch.column(item_column))
            if has_time:
                seconds, bad, _ = timestamp_seconds(batch.column("timestamp").to_pandas())
                if bad.any():
                    raise _NotStreamable("a bad timestamp")
                times.append(seconds)
            if has_weight:
                values, bad = weight_values(batch.column("weight").to_pandas())
                if bad.any():
                    raise _NotStreamable("a bad weight")
                weights.append(values)
    except (pa.ArrowInvalid, ValueError, TypeError) as e:  # a row of the wrong width, a value of another type
        raise _NotStreamable(str(e)) from e
    user_codes, user_ids = users.finish()
    item_codes, item_ids = items.finish()
    if not len(user_codes):
        raise DataFormatError(f"{source}: no interactions")
    user, user_ids = sorted_codes(user_codes, user_ids)
    return interactions_from_codes(
        user,
        item_codes,
        user_ids,
        item_ids,
        np.concatenate(times) if has_time else None,
        np.concatenate(weights) if has_weight else None,
        source,
    )


def _located_interactions(source: Path) -> Interactions:
    """The interactions table read whole, cell by cell checked: a malformed one raises `DataFormatError` naming
    file:line:column (CSV) or row and column (Parquet)."""
    table = read_table(source)
    user_column = table.require(("user_id", "user"))
    item_column = table.require(("item_id", "item"))
    users_ids, item_ids = _table_ids(table, user_column), _table_ids(table, item_column)
    timestamps = _table_timestamps(table, "timestamp") if "timestamp" in table.frame.columns else None
    weights = _table_weights(table, "weight") if "weight" in table.frame.columns else None
    if table.frame.empty:
        raise DataFormatError(f"{source}: no interactions")
    return make_interactions(users_ids, item_ids, timestamps, weights, source=source)


def read_interactions(source: Path) -> Interactions:
    """An interactions table as integer arrays: streamed in chunks; when the stream meets a malformed cell, the file
    is re-read whole to name it (or, if the streaming reader was only stricter than needed, to read it anyway)."""
    try:
        return _stream_interactions(source)
    except _NotStreamable as e:
        log.info("%s: streaming reader stopped (%s); re-reading it whole to locate the problem", source, e)
        return _located_interactions(source)


def load_interactions(path: Path) -> Dataset:
    """Generic tables: `interactions.csv|parquet` in a folder (or any .csv/.parquet file given directly)
    with columns user_id (or user), item_id (or item), optional timestamp (unix seconds or ISO 8601; without
    it, row order) and optional weight; optional `users.csv|parquet` (user_id + feature columns) and
    `items.csv|parquet` (item_id + feature columns) beside it. The feature spec is inferred from those
    tables (see `_infer_feature`)."""
    source = path if path.is_file() else _beside(path, "interactions")
    if source is None:
        raise DataFormatError(f"{path}: no interactions.csv or interactions.parquet")
    interactions = read_interactions(source)
    tables: dict[str, _FeatureTable | None] = {}
    for kind in ("user", "item"):
        side = _beside(source.parent, f"{kind}s")
        tables[kind] = (*_read_feature_table(side, (f"{kind}_id", kind)), side) if side is not None else None
    _rename_shared_feature_names(tables)
    user_entry, item_entry = tables["user"], tables["item"]
    spec = FeatureSpec(
        tuple(user_entry[1]) if user_entry else (),
        tuple(item_entry[1]) if item_entry else (),
    )
    name = source.parent.name if path.is_dir() else source.stem
    return build_dataset(
        name,
        interactions,
        user_entry[0] if user_entry else None,
        item_entry[0] if item_entry else None,
        spec,
        user_entry[2] if user_entry else "users",
        item_entry[2] if item_entry else "items",
    )


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
