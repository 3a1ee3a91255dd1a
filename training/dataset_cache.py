"""The encoded-dataset cache: a dataset read once is kept as its arrays (`.npy`) and tables (Parquet) in a directory
named by the hash of its input files, so a re-run on the same data skips parsing and encoding, and the arrays are
memory-mapped (processes of one torchrun share them through the page cache).

Used by `training.data.load_dataset(path, cache_dir=...)` (the `twotower train` default: `--cache-dir`, else
$TWOTOWER_CACHE_DIR, else ~/.cache/twotower/datasets). The key covers every file of the dataset's folder (name,
size, content) and `CACHE_FORMAT`, which changes whenever reading or encoding does; a directory that does not
read back whole is ignored and rebuilt. Entries are written under a temporary name and published with
`os.replace`, so two processes racing to fill the same entry leave one complete copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.dataset import Dataset, Interactions
from training.features import FeatureSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ARRAYS = ("user", "item", "timestamp", "weight")
READ_CHUNK = 1 << 24


def default_cache_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE_DIR", Path.home() / ".cache" / "twotower" / "datasets"))


def input_key(path: Path) -> str:
    """Hash of the dataset's input: every regular file of its folder (or the folder of the file given), by name,
    size and content; and what was given (a folder or which file)."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format {CACHE_FORMAT}; given {path.name if path.is_file() else '.'}".encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"\x1e{file.name}\x1f{file.stat().st_size}\x1f".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _lists(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet gives list cells back as numpy arrays: make them lists again, as the loaders produce them."""
    for name in frame.columns:
        column = frame[name]
        if column.dtype == object and any(isinstance(v, np.ndarray) for v in column.head(1000)):
            frame[name] = [v.tolist() if isinstance(v, np.ndarray) else v for v in column]
    return frame


def load(directory: Path) -> Dataset | None:
    """The dataset cached in `directory`, arrays memory-mapped; None when it is absent or incomplete."""
    try:
        meta = json.loads((directory / "dataset.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
        user_ids = np.asarray(pq.read_table(directory / "user_ids.parquet").column("id").to_pylist(), dtype=object)
        item_ids = np.asarray(pq.read_table(directory / "item_ids.parquet").column("id").to_pylist(), dtype=object)
        users = _lists(pd.read_parquet(directory / "users.parquet")).set_index("user_id")
        items = _lists(pd.read_parquet(directory / "items.parquet")).set_index("item_id")
    except (OSError, ValueError, KeyError) as e:
        log.warning("dataset cache %s is unreadable (%s); reading the data again", directory, e)
        return None
    users.index, items.index = users.index.astype(object), items.index.astype(object)
    interactions = Interactions(
        arrays["user"], arrays["item"], arrays["timestamp"], arrays["weight"], user_ids, item_ids
    )
    return Dataset(meta["name"], interactions, users, items, FeatureSpec.from_dict(meta["spec"]))


def save(directory: Path, dataset: Dataset) -> None:
    """Write `dataset` to `directory` (published whole, or not at all). A table Parquet cannot hold (a column of
    mixed types) leaves the dataset uncached, with a warning: the run goes on."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        rows = dataset.interactions
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(rows, name)), allow_pickle=False)
        for name, ids in (("user_ids", rows.user_ids), ("item_ids", rows.item_ids)):
            pq.write_table(pa.table({"id": pa.array(ids.tolist(), type=pa.string())}), tmp / f"{name}.parquet")
        dataset.users.rename_axis("user_id").reset_index().to_parquet(tmp / "users.parquet", index=False)
        dataset.items.rename_axis("item_id").reset_index().to_parquet(tmp / "items.parquet", index=False)
        meta = {"format": CACHE_FORMAT, "name": dataset.name, "spec": dataset.spec.to_dict()}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, directory)
        except OSError:  # another process published it first: theirs stands
            shutil.rmtree(tmp, ignore_errors=True)
    except (pa.ArrowException, ValueError, TypeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("dataset %s not cached (%s: %s)", dataset.name, type(e).__name__, e)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
