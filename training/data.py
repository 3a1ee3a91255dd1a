"""Offline data: the `Dataset` every loader returns, the loaders, the synthetic generator and the split.

Only the training side imports this module (the service never reads raw data files).

A `Dataset` is three tables with string ids:
- `interactions`: columns user_id, item_id (str), timestamp (int64), weight (float32); one row per event;
- `users`: indexed by user_id, one column per raw user feature (what `FeatureSpec.user_features` names);
- `items`: indexed by item_id, one column per raw item feature; multi-valued features are lists of str.
plus the `FeatureSpec` that fits those columns. `users` and `items` cover every id of the interactions (an id
missing from a feature table gets missing features: NaN/None, [] for multi-valued ones) and keep rows without
interactions (the catalog is the whole item table).

Loaders (`LOADERS`, chosen by `load_dataset` from the files present): MovieLens 100K, 1M (and 10M),
latest/20M/25M, and generic interactions tables (CSV/Parquet). Malformed input raises `DataFormatError` naming
file:line:column; whatever a loader drops or fills in (duplicates, blank lines, undescribed ids) is counted in
the log.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from training.features import FeatureDef, FeatureSpec

log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """An input file is malformed; the message names the file, line and column."""


@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    spec: FeatureSpec

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.interactions):,} interactions, "
            f"{self.interactions.user_id.nunique():,} users, {len(self.items):,} catalog items"
        )


Column: TypeAlias = Sequence[Any] | np.ndarray | pd.Series


def make_interactions(
    users: Column,
    items: Column,
    timestamps: Column | None = None,
    weights: Column | None = None,
    source: str | Path | None = None,
) -> pd.DataFrame:
    """The canonical interactions table; duplicate (user, item) pairs keep their latest event (and are
    counted). `source` (the file read) only makes that log message say where the duplicates came from."""
    n = len(users)
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str).to_numpy(dtype=object),
            "item_id": pd.Series(items, dtype=str).to_numpy(dtype=object),
            "timestamp": np.asarray(timestamps if timestamps is not None else np.arange(n), dtype=np.int64),
            "weight": np.asarray(weights if weights is not None else np.ones(n), dtype=np.float32),
        }
    )
    frame = frame.sort_values("timestamp", kind="stable")
    deduped = frame.drop_duplicates(["user_id", "item_id"], keep="last")
    if len(deduped) < n:
        log.warning(
            "%sdropped %d duplicate (user, item) interactions, kept the latest of each",
            f"{source}: " if source else "",
            n - len(deduped),
        )
    return deduped.reset_index(drop=True)


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


def _optional_int(raw: str) -> int | None:
    return int(raw) if raw.strip() else None


# --------------------------------------------------------------------------- MovieLens 100K

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# Age buckets as MovieLens 1M defines them, so both datasets share one user spec.
AGE_BOUNDARIES = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)
YEAR_BOUNDARIES = tuple(float(y) for y in range(1930, 2030, 10))

MOVIELENS_SPEC = FeatureSpec(
    user_features=(
        FeatureDef("age", "bucket", boundaries=AGE_BOUNDARIES),
        FeatureDef("gender"),
        FeatureDef("occupation"),
        FeatureDef("zip", "prefix", prefix_len=2),
    ),
    item_features=(
        FeatureDef("genres", "multi", max_values=6),
        FeatureDef("year", "bucket", boundaries=YEAR_BOUNDARIES),
    ),
)


def _release_year(raw: str) -> int | None:
    # "01-Jan-1995" (a few items have an empty date)
    raw = raw.strip()
    return int(raw[-4:]) if raw else None


def _flag(raw: str) -> int:
    value = int(raw)
    if value not in (0, 1):
        raise ValueError("genre flag must be 0 or 1")
    return value


def load_movielens_100k(path: Path) -> Dataset:
    path = _folder(path)
    ratings = read_delimited(
        path / "u.data", "\t", [("user_id", str), ("item_id", str), ("rating", int), ("timestamp", int)]
    )
    users = read_delimited(
        path / "u.user",
        "|",
        [("user_id", str), ("age", int), ("gender", str), ("occupation", str), ("zip", str)],
    ).set_index("user_id")
    item_columns: list[tuple[str, Callable[[str], Any]]] = [
        ("item_id", str),
        ("title", str),
        ("release", _release_year),
        ("video_release", str),
        ("url", str),
        *((f"g:{g}", _flag) for g in ML100K_GENRES),
    ]
    raw_items = read_delimited(path / "u.item", "|", item_columns, encoding="latin-1")
    flags = raw_items[[f"g:{g}" for g in ML100K_GENRES]].to_numpy()
    items = pd.DataFrame(
        {
            "genres": [[g for g, f in zip(ML100K_GENRES, row, strict=True) if f] for row in flags],
            "year": raw_items["release"].to_numpy(),
            "title": raw_items["title"].to_numpy(),
        },
        index=raw_items["item_id"].rename("item_id"),
    )
    # Every rating is a positive (DESIGN §4); the rating is kept as the weight for other uses.
    interactions = make_interactions(
        ratings.user_id,
        ratings.item_id,
        ratings.timestamp,
        ratings.rating.astype(np.float32),
        source=path / "u.data",
    )
    users = _cover(users, interactions.user_id, (), path / "u.user")
    items = _cover(items, interactions.item_id, ("genres",), path / "u.item")
    return Dataset("movielens-100k", interactions, users, items, MOVIELENS_SPEC)


# --------------------------------------------------------------------------- helpers shared by the loaders


def _folder(path: Path) -> Path:
    """Folder formats accept the folder or any file in it."""
    return path if path.is_dir() else path.parent


def _id(raw: str) -> str:
    if not raw.strip():
        raise ValueError("empty id")
    return raw


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not np.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _decode_error(path: Path, encoding: str, error: UnicodeDecodeError) -> DataFormatError:
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


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
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


def _drop_duplicate_ids(table: pd.DataFrame, source: Path) -> pd.DataFrame:
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


def _cover(table: pd.DataFrame, ids: pd.Series, multi: Sequence[str], source: Path) -> pd.DataFrame:
    """`table` plus a row with missing features (NaN; [] for the `multi` columns) for each of `ids` it
    lacks, so every user and item of the interactions is described; rows without interactions stay too."""
    extra = pd.unique(ids[~ids.isin(table.index)].to_numpy())
    if len(extra) == 0:
        return table
    log.warning(
        "%s: %d %ss appear in the interactions but not in this table; kept with missing features, e.g. %r",
        source,
        len(extra),
        table.index.name,
        extra[0],
    )
    out = table.reindex(table.index.append(pd.Index(extra, dtype=object)))
    out.index.name = table.index.name
    for name in multi:
        out[name] = [v if isinstance(v, list) else [] for v in out[name]]
    return out


def _bare_table(ids: pd.Series, name: str) -> pd.DataFrame:
    """A table of the distinct `ids` with no feature columns (the format has no such table)."""
    return pd.DataFrame(index=pd.Index(pd.unique(ids.to_numpy()), name=name, dtype=object))


def _check_widths(items: pd.DataFrame, features: Sequence[FeatureDef], source: Path) -> None:
    """Multi-valued features keep `max_values` values per row; say how many rows lose some."""
    for feature in features:
        if feature.kind == "multi" and feature.name in items:
            over = sum(len(v) > feature.max_values for v in items[feature.name] if isinstance(v, list))
            if over:
                log.warning(
                    "%s: %d rows have more than %d %s; the encoder keeps the first %d",
                    source,
                    over,
                    feature.max_values,
                    feature.name,
                    feature.max_values,
                )


# Ratings files can hold 25M rows: pandas' C parser reads them, the line-by-line reader only locates errors.
_RATING_COLUMNS: list[tuple[str, Callable[[str], Any]]] = [
    ("user_id", _id),
    ("item_id", _id),
    ("rating", _finite_float),
    ("timestamp", int),
]


def _check_header(path: Path, sep: str, header: Sequence[str], encoding: str) -> None:
    with path.open(encoding=encoding, newline="") as handle:
        first = handle.readline().rstrip("\r\n").lstrip("\ufeff")
    found = [field.strip().strip('"') for field in first.split(sep)]
    if found != list(header):
        missing = [c for c in header if c not in found]
        detail = f"missing column {', '.join(map(repr, missing))}" if missing else "other or extra columns"
        raise DataFormatError(f"{path}:1: expected the header {sep.join(header)!r}, found {first!r} ({detail})")


def _read_ratings_fast(path: Path, sep: str, has_header: bool, encoding: str) -> pd.DataFrame:
    """Raises ValueError (or a ParserWarning) on anything unexpected; `_read_ratings` then re-reads slowly."""
    # The C parser takes one-character separators: "1::2" read with ":" is "1", "", "2", and the empty filler
    # columns are checked below, so a stray single ":" can't shift fields unnoticed.
    char, stride = sep[0], len(sep)
    if sep != char * stride:
        raise ValueError(f"separator {sep!r} needs the line-by-line reader")
    positions = [0, stride, 2 * stride, 3 * stride]
    width = positions[-1] + 1
    dtypes: dict[int, Any] = {p: str for p in range(width)}
    dtypes[positions[2]], dtypes[positions[3]] = np.float64, np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        raw = pd.read_csv(
            path,
            sep=char,
            header=None,
            skiprows=1 if has_header else 0,
            dtype=dtypes,
            keep_default_na=False,
            na_values=[""],
            index_col=False,
            quoting=csv.QUOTE_NONE,
            encoding=encoding,
            engine="c",
        )
    if raw.shape[1] != width:
        raise ValueError(f"found {raw.shape[1]} columns, expected {width}")
    fillers = [p for p in range(width) if p not in positions]
    if fillers and raw[fillers].notna().to_numpy().any():
        raise ValueError(f"a field contains {char!r}")
    user, item, rating, timestamp = (raw[p] for p in positions)
    if user.isna().any() or item.isna().any() or not np.isfinite(rating.to_numpy()).all():
        raise ValueError("missing or non-finite values")
    return pd.DataFrame(
        {
            "user_id": user.to_numpy(dtype=object),
            "item_id": item.to_numpy(dtype=object),
            "rating": rating.to_numpy(dtype=np.float32),
            "timestamp": timestamp.to_numpy(dtype=np.int64),
        }
    )


def _read_ratings(path: Path, sep: str, header: Sequence[str] | None = None, encoding: str = "utf-8") -> pd.DataFrame:
    """user_id, item_id (str), rating (float32), timestamp (int64) from lines `user sep item sep rating sep
    time`.

    The fast parser reads the file; if it fails or meets a missing value, the file is re-read line by line,
    which raises `DataFormatError` naming the first bad file:line:column (or, if the fast parser was merely
    stricter than needed, returns the same table)."""
    if header is not None:
        _check_header(path, sep, header, encoding)
    try:
        frame = _read_ratings_fast(path, sep, header is not None, encoding)
    except (ValueError, OverflowError, Warning) as e:  # pandas' ParserError, EmptyDataError are ValueErrors
        log.info("%s: fast parser stopped (%s); re-reading line by line", path, e)
        try:
            frame = read_delimited(
                path, sep, _RATING_COLUMNS, encoding=encoding, skip_header=header is not None, max_fields=4
            )
        except UnicodeDecodeError as decode_error:
            raise _decode_error(path, encoding, decode_error) from decode_error
        frame["rating"] = frame["rating"].astype(np.float32)
        frame["timestamp"] = frame["timestamp"].astype(np.int64)
        return frame
    blank = _count_lines(path) - (header is not None) - len(frame)
    if blank:
        log.info("%s: skipped %d blank lines", path, blank)
    return frame


_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-–]\s*(?:\d{4})?)?\)\s*$")


def _title_year(title: str) -> float:
    """The year of "Title (1995)" (or of "Series (1975-1979)"); NaN when the title has none."""
    match = _TITLE_YEAR.search(title)
    return float(match.group(1)) if match else float("nan")


def _genre_list(raw: str) -> list[str]:
    return [g for g in (part.strip() for part in raw.split("|")) if g and g != "(no genres listed)"]


def _movies_frame(ids: list[str], titles: list[str], genres: list[list[str]], source: Path) -> pd.DataFrame:
    items = pd.DataFrame(
        {"genres": genres, "year": [_title_year(t) for t in titles], "title": titles},
        index=pd.Index(ids, name="item_id", dtype=object),
    )
    return _drop_duplicate_ids(items, source)


# --------------------------------------------------------------------------- MovieLens 1M (and 10M)

# MovieLens 10M, 20M, 25M and "latest" have no user table; up to 10 genres per movie.
MOVIELENS_LATEST_SPEC = FeatureSpec(
    item_features=(
        FeatureDef("genres", "multi", max_values=10),
        FeatureDef("year", "bucket", boundaries=YEAR_BOUNDARIES),
    ),
)


def _read_movies_dat(path: Path) -> pd.DataFrame:
    ids: list[str] = []
    titles: list[str] = []
    genres: list[list[str]] = []
    for lineno, line in _lines(path, "latin-1"):
        # Split the id from the left and the genres from the right, so a title containing "::" stays whole.
        head = line.split("::", 1)
        parts = [head[0], *head[1].rsplit("::", 1)] if len(head) == 2 else head
        if len(parts) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 3 fields MovieID::Title::Genres, found {len(parts)}")
        if not parts[0].strip():
            raise DataFormatError(f"{path}:{lineno}:1: empty MovieID")
        ids.append(parts[0])
        titles.append(parts[1])
        genres.append(_genre_list(parts[2]))
    return _movies_frame(ids, titles, genres, path)


def _occupation_code(raw: str) -> str:
    return str(int(raw))


def _read_users_dat(path: Path) -> pd.DataFrame:
    users = read_delimited(
        path,
        "::",
        [("user_id", _id), ("gender", _id), ("age", int), ("occupation", _occupation_code), ("zip", str)],
        encoding="latin-1",
        max_fields=5,
    ).set_index("user_id")
    users.index = users.index.astype(object)
    return _drop_duplicate_ids(users[["age", "gender", "occupation", "zip"]], path)


def load_movielens_1m(path: Path) -> Dataset:
    """MovieLens 1M: `ratings.dat`, `users.dat`, `movies.dat` (latin-1), fields separated by "::"; the
    occupation stays its integer code ("0".."20") and the year comes from the title. MovieLens 10M has the
    same files without `users.dat`; its users then have no features."""
    folder = _folder(path)
    ratings = _read_ratings(folder / "ratings.dat", "::", encoding="latin-1")
    interactions = make_interactions(
        ratings.user_id, ratings.item_id, ratings.timestamp, ratings.rating, source=folder / "ratings.dat"
    )
    if (folder / "users.dat").exists():
        name, spec = "movielens-1m", MOVIELENS_SPEC
        users = _cover(_read_users_dat(folder / "users.dat"), interactions.user_id, (), folder / "users.dat")
    else:
        name, spec = "movielens-10m", MOVIELENS_LATEST_SPEC
        users = _bare_table(interactions.user_id, "user_id")
    movies = folder / "movies.dat"
    items = _cover(_read_movies_dat(movies), interactions.item_id, ("genres",), movies)
    _check_widths(items, spec.item_features, movies)
    return Dataset(name, interactions, users, items, spec)


# --------------------------------------------------------------------------- MovieLens latest / 20M / 25M


def _read_movies_csv(path: Path) -> pd.DataFrame:
    header = ["movieId", "title", "genres"]
    ids: list[str] = []
    titles: list[str] = []
    genres: list[list[str]] = []
    blank = 0
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            first = next(reader, [])
            if [f.lstrip("\ufeff") for f in first] != header:
                missing = [c for c in header if c not in first]
                raise DataFormatError(
                    f"{path}:1: expected the header {','.join(header)!r}, found {','.join(first)!r}"
                    + (f" (missing column {', '.join(map(repr, missing))})" if missing else "")
                )
            start = reader.line_num + 1
            for fields in reader:
                # Quoted titles may span lines: report the line where the row starts.
                lineno, start = start, reader.line_num + 1
                if not fields:
                    blank += 1
                    continue
                if len(fields) != 3:
                    raise DataFormatError(
                        f"{path}:{lineno}: expected 3 fields (movieId,title,genres), found {len(fields)}"
                    )
                if not fields[0].strip():
                    raise DataFormatError(f"{path}:{lineno}:1: empty movieId")
                ids.append(fields[0])
                titles.append(fields[1])
                genres.append(_genre_list(fields[2]))
        except UnicodeDecodeError as e:
            raise _decode_error(path, "utf-8", e) from e
        except csv.Error as e:
            raise DataFormatError(f"{path}:{reader.line_num}: {e}") from e
    if blank:
        log.info("%s: skipped %d blank lines", path, blank)
    return _movies_frame(ids, titles, genres, path)


def load_movielens_latest(path: Path) -> Dataset:
    """MovieLens latest / 20M / 25M: `ratings.csv` (userId,movieId,rating,timestamp) and `movies.csv`
    (movieId,title,genres; quoted titles). There is no user table, so users have no features."""
    folder = _folder(path)
    ratings = _read_ratings(folder / "ratings.csv", ",", header=("userId", "movieId", "rating", "timestamp"))
    interactions = make_interactions(
        ratings.user_id, ratings.item_id, ratings.timestamp, ratings.rating, source=folder / "ratings.csv"
    )
    movies = folder / "movies.csv"
    items = _cover(_read_movies_csv(movies), interactions.item_id, ("genres",), movies)
    _check_widths(items, MOVIELENS_LATEST_SPEC.item_features, movies)
    name = folder.name.lower()
    name = f"movielens-{name.removeprefix('ml-')}" if name.startswith("ml-") else "movielens-latest"
    users = _bare_table(interactions.user_id, "user_id")
    return Dataset(name, interactions, users, items, MOVIELENS_LATEST_SPEC)


# --------------------------------------------------------------------------- generic interactions tables

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
        raise _decode_error(path, "utf-8", e) from e
    except pd.errors.EmptyDataError as e:
        raise DataFormatError(f"{path}: empty file, expected a header line") from e
    except (ValueError, Warning) as e:  # too many or too few fields somewhere
        raise _csv_shape_error(path, e) from e
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        log.info("%s: skipped %d blank lines", path, int(blank.sum()))
        frame = frame[~blank]  # keep the record numbers as the index, for error messages
    return _Table(path, frame)


def _table_ids(table: _Table, column: str) -> pd.Series:
    values = table.frame[column]
    table.fail_first(values.isna(), column, "an id")
    if pd.api.types.is_float_dtype(values) and (values == np.floor(values)).all():
        values = values.astype(np.int64)  # ids stored as floats: "7", not "7.0"
    return values.astype(str)


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
    raw = _drop_duplicate_ids(raw, path)
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
            return _bare_table(ids, f"{kind}_id"), ()
        frame, features, side = entry
        frame = _cover(frame, ids, [f.name for f in features if f.kind == "multi"], side)
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


# --------------------------------------------------------------------------- format detection

# name -> (files that identify it, loader). Checked in order; the first whose files all exist wins.
# A file given directly selects a format only if it is one of that format's files; any other .csv/.parquet
# file is read as a generic interactions table.
LOADERS: list[tuple[str, tuple[str, ...], Callable[[Path], Dataset]]] = [
    ("movielens-100k", ("u.data", "u.item", "u.user"), load_movielens_100k),
    ("movielens-1m", ("ratings.dat", "movies.dat", "users.dat"), load_movielens_1m),
    ("movielens-10m", ("ratings.dat", "movies.dat"), load_movielens_1m),
    ("movielens-latest", ("ratings.csv", "movies.csv"), load_movielens_latest),
    ("interactions-csv", ("interactions.csv",), load_interactions),
    ("interactions-parquet", ("interactions.parquet",), load_interactions),
]


def load_dataset(path: str | Path) -> Dataset:
    """Load a dataset folder (or file), detecting its format from the files present; logs the choice."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    folder = path if path.is_dir() else path.parent
    for name, files, loader in LOADERS:
        if path.is_file() and path.name not in files:
            continue
        if all((folder / f).exists() for f in files):
            log.info("%s: detected format %s (found %s)", path, name, ", ".join(files))
            dataset = loader(path if path.is_file() else folder)
            log.info("loaded %s", dataset.describe())
            return dataset
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        log.info("%s: detected format interactions (a %s table given directly)", path, path.suffix.lower())
        dataset = load_interactions(path)
        log.info("loaded %s", dataset.describe())
        return dataset
    known = "; ".join(f"{name}: {', '.join(files)}" for name, files, _ in LOADERS)
    raise DataFormatError(
        f"{path}: no known dataset format; expected one of these file sets: {known}; "
        f"or a {'/'.join(TABLE_SUFFIXES)} interactions file"
    )


# --------------------------------------------------------------------------- synthetic data

SYNTHETIC_SPEC = FeatureSpec(
    user_features=(FeatureDef("segment"), FeatureDef("region")),
    item_features=(
        FeatureDef("genres", "multi", max_values=4),
        FeatureDef("year", "bucket", boundaries=YEAR_BOUNDARIES),
    ),
    max_history=100,
)


def synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_clusters: int = 10,
    interactions_per_user: int = 30,
    in_cluster: float = 0.85,
    seed: int = 0,
) -> Dataset:
    """Deterministic data with planted structure: each user and item belongs to one of `n_clusters`
    clusters; users mostly interact with popular items of their own cluster. Features carry the cluster
    noisily (a user's `segment`, an item's first genre), so a model can learn it and cold users and items are
    recoverable."""
    if n_clusters < 1 or n_items < n_clusters:
        raise ValueError(f"need 1 <= n_clusters ({n_clusters}) <= n_items ({n_items})")
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(n_items) % n_clusters
    rng.shuffle(item_cluster)
    user_cluster = rng.integers(0, n_clusters, n_users)
    # Zipf-like popularity within each cluster.
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.8
    members = [np.flatnonzero(item_cluster == c) for c in range(n_clusters)]
    member_p = [popularity[m] / popularity[m].sum() for m in members]

    counts = np.maximum(3, rng.poisson(interactions_per_user, n_users))
    user_idx = np.repeat(np.arange(n_users), counts)
    own = rng.random(len(user_idx)) < in_cluster
    cluster = np.where(own, user_cluster[user_idx], rng.integers(0, n_clusters, len(user_idx)))
    item_idx = np.empty(len(user_idx), dtype=np.int64)
    for c in range(n_clusters):
        rows = np.flatnonzero(cluster == c)
        item_idx[rows] = rng.choice(members[c], size=len(rows), p=member_p[c])
    interactions = make_interactions(
        [f"u{u}" for u in user_idx],
        [f"i{i}" for i in item_idx],
        np.arange(len(user_idx)) * 60 + 1_000_000_000,
    )

    segment = np.where(rng.random(n_users) < 0.8, user_cluster, rng.integers(0, n_clusters, n_users))
    users = pd.DataFrame(
        {"segment": [f"s{s}" for s in segment], "region": [f"r{r}" for r in rng.integers(0, 5, n_users)]},
        index=pd.Index([f"u{u}" for u in range(n_users)], name="user_id"),
    )
    extra = rng.integers(0, n_clusters, n_items)
    has_extra = rng.random(n_items) < 0.3
    items = pd.DataFrame(
        {
            "genres": [
                [f"g{c}", f"g{e}"] if x and e != c else [f"g{c}"]
                for c, e, x in zip(item_cluster, extra, has_extra, strict=True)
            ],
            "year": rng.integers(1950, 2024, n_items),
        },
        index=pd.Index([f"i{i}" for i in range(n_items)], name="item_id"),
    )
    name = f"synthetic-{n_users}u-{n_items}i-{n_clusters}c-s{seed}"
    return Dataset(name, interactions, users, items, SYNTHETIC_SPEC)


# --------------------------------------------------------------------------- split (DESIGN §4)


def split_random(interactions: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One global uniform random split of interaction rows: (rest, held out `fraction`)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(interactions), dtype=bool)
    held[rng.permutation(len(interactions))[: round(len(interactions) * fraction)]] = True
    return interactions[~held].reset_index(drop=True), interactions[held].reset_index(drop=True)
