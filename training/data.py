"""`load_dataset`: which format a dataset folder (or file) is in, from the files present, and the loader for it.

Formats (`LOADERS`, checked in order): MovieLens 100K, 1M, 10M and latest/20M/25M (`training.movielens`), and
the generic interactions tables (`training.tables`). The choice is logged; a folder that fits none is refused
with the file sets that were expected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from training import dataset_cache
from training.dataset import Dataset
from training.movielens import load_movielens_1m, load_movielens_100k, load_movielens_latest
from training.tables import TABLE_SUFFIXES, DataFormatError, load_interactions

log = logging.getLogger(__name__)

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


def load_dataset(path: str | Path, cache_dir: Path | None = None) -> Dataset:
    """Load a dataset folder (or file), detecting its format from the files present; logs the choice. With
    `cache_dir`, the encoded dataset is kept there under the hash of its input and read back from it next time
    (`training.dataset_cache`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    if cache_dir is None:
        return _read(path)
    entry = Path(cache_dir) / dataset_cache.input_key(path)
    cached = dataset_cache.load(entry) if entry.is_dir() else None
    if cached is not None:
        log.info("%s: read from the dataset cache %s: %s", path, entry, cached.describe())
        return cached
    dataset = _read(path)
    dataset_cache.save(entry, dataset)
    return dataset


def _read(path: Path) -> Dataset:
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
