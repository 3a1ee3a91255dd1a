"""The MovieLens loaders: 100K (`u.data`, `u.user`, `u.item`), 1M and 10M (`ratings.dat`, `movies.dat`,
`users.dat`), latest/20M/25M (`ratings.csv`, `movies.csv`), each returning a `Dataset` with its feature spec.

Ratings files can hold 25M rows: pandas' C parser reads them, and the line-by-line reader of `training.tables`
re-reads a file only to locate the first malformed field.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.dataset import YEAR_BOUNDARIES, Dataset, build_dataset, make_interactions
from training.features import FeatureDef, FeatureSpec
from training.tables import DataFormatError, decode_error, drop_duplicate_ids, nonblank_lines, read_delimited

log = logging.getLogger(__name__)


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
    return build_dataset("movielens-100k", interactions, users, items, MOVIELENS_SPEC, path / "u.user", path / "u.item")


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
        except UnicodeDecodeError as undecodable:
            raise decode_error(path, encoding, undecodable) from undecodable
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
    return drop_duplicate_ids(items, source)


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
    for lineno, line in nonblank_lines(path, "latin-1"):
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
    return drop_duplicate_ids(users[["age", "gender", "occupation", "zip"]], path)


def load_movielens_1m(path: Path) -> Dataset:
    """MovieLens 1M: `ratings.dat`, `users.dat`, `movies.dat` (latin-1), fields separated by "::"; the
    occupation stays its integer code ("0".."20") and the year comes from the title. MovieLens 10M has the
    same files without `users.dat`; its users then have no features."""
    folder = _folder(path)
    ratings = _read_ratings(folder / "ratings.dat", "::", encoding="latin-1")
    interactions = make_interactions(
        ratings.user_id, ratings.item_id, ratings.timestamp, ratings.rating, source=folder / "ratings.dat"
    )
    users: pd.DataFrame | None = None
    if (folder / "users.dat").exists():
        name, spec = "movielens-1m", MOVIELENS_SPEC
        users = _read_users_dat(folder / "users.dat")
    else:
        name, spec = "movielens-10m", MOVIELENS_LATEST_SPEC
    movies = folder / "movies.dat"
    dataset = build_dataset(name, interactions, users, _read_movies_dat(movies), spec, folder / "users.dat", movies)
    _check_widths(dataset.items, spec.item_features, movies)
    return dataset


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
            raise decode_error(path, "utf-8", e) from e
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
    name = folder.name.lower()
    name = f"movielens-{name.removeprefix('ml-')}" if name.startswith("ml-") else "movielens-latest"
    dataset = build_dataset(name, interactions, None, _read_movies_csv(movies), MOVIELENS_LATEST_SPEC, "users", movies)
    _check_widths(dataset.items, MOVIELENS_LATEST_SPEC.item_features, movies)
    return dataset
