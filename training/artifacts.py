"""Artifact directories: versions, manifests with checksums, atomic publish and the active-index pointer.

Shared by the trainer, the re-index job and the service. Layout under an artifacts root:

    models/<model_version>/    manifest.json + files (written by training.train)
    indexes/<index_version>/   manifest.json + files (written by training.reindex)
    ACTIVE_INDEX               the published index version (one line), replaced atomically

Every directory is written under a temporary name beside its final place and published with `os.replace`,
so a reader sees either nothing or a complete artifact. Loading verifies each file's sha256 against the
manifest and refuses a mismatch with a message naming the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.features import FeatureSpec, Vocabularies
from training.model import TowerConfig, TwoTower

MANIFEST = "manifest.json"
ACTIVE_INDEX = "ACTIVE_INDEX"
FORMAT_VERSION = 1
INDEX_VERSION_PREFIX = "idx-"
# What a version name may be: what `new_version` makes, and any plain directory name an operator chose.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_VERSION_RE = re.compile(VERSION_PATTERN)


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupted, or does not match what it is paired with."""


class VersionMismatchError(ArtifactError):
    """An index and a model (or a model and its vocabularies) come from different training runs."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_version(prefix: str = "") -> str:
    """Sortable, unique version names: UTC time to the microsecond plus a random suffix."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}{now}-{secrets.token_hex(3)}"


def check_version(version: str, what: str = "version") -> str:
    """`version` if it is a valid version name (a plain directory name); else `ArtifactError`. Versions come from
    pointer files, manifests, Redis messages and admin calls: anything else (a path, "..") is refused before use."""
    if not _VERSION_RE.match(version):
        raise ArtifactError(f"{what} {version!r} is not a valid artifact version name (expected {VERSION_PATTERN})")
    return version


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it becomes `final` with one `os.replace`.

    On any error the temporary directory is removed and nothing is published."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise ArtifactError(f"{final} already exists; artifacts are immutable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `directory` into the manifest and write it; returns the manifest written."""
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    full = {"format_version": FORMAT_VERSION, "created_at": utc_now(), **manifest, "files": files}
    write_json(directory / MANIFEST, full)
    return full


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    """Read and verify a manifest: the kind, then every listed file's size and sha256."""
    path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} not found: {directory} is not a {kind} artifact") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{path}: expected a {kind} manifest, found kind={manifest.get('kind')!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r} != supported {FORMAT_VERSION}")
    for name, meta in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != meta["sha256"]:
            raise ArtifactError(f"{file} is corrupted: sha256 {actual[:12]}… != manifest {meta['sha256'][:12]}…")
    return manifest


@dataclass(frozen=True)
class ArtifactStore:
    """Paths and listing under one artifacts root."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    def model_dir(self, version: str) -> Path:
        return self.models / version

    def index_dir(self, version: str) -> Path:
        return self.indexes / version

    @staticmethod
    def _versions(folder: Path) -> list[str]:
        if not folder.is_dir():
            return []
        # Versions sort by their creation time prefix; temp dirs start with "." and are skipped.
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def model_versions(self) -> list[str]:
        return self._versions(self.models)

    def index_versions(self) -> list[str]:
        return self._versions(self.indexes)

    def latest_model(self) -> str:
        versions = self.model_versions()
        if not versions:
            raise ArtifactError(f"no model under {self.models}: run `twotower train` first")
        return versions[-1]

    def active_index(self) -> str | None:
        try:
            return (self.root / ACTIVE_INDEX).read_text().strip() or None
        except FileNotFoundError:
            return None

    def index_manifest(self, version: str) -> dict[str, Any]:
        """The verified manifest of index `version` (`read_manifest`: kind and every file's checksum)."""
        return read_manifest(self.index_dir(check_version(version, "index version")), "index")

    def active_model(self) -> str:
        """The model the active index was built from (the pair a service serves); the newest model while no
        index is active."""
        active = self.active_index()
        if active is None:
            return self.latest_model()
        return check_version(str(self.index_manifest(active)["model_version"]), f"model of index {active}")

    def set_active_index(self, version: str) -> None:
        if not self.index_dir(version).is_dir():
            raise ArtifactError(f"cannot activate index {version}: {self.index_dir(version)} does not exist")
        tmp = self.root / f".{ACTIVE_INDEX}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(version + "\n")
        os.replace(tmp, self.root / ACTIVE_INDEX)


# --------------------------------------------------------------------------- model artifacts

USER_TOWER = "user_tower.safetensors"
ITEM_TOWER = "item_tower.safetensors"
VOCABULARIES = "vocabularies.json"
ITEM_IDS = "item_ids.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
CATALOG = "catalog.parquet"
USERS = "users.parquet"
METRIC = "inner_product"
INDEX_ITEMS = "items.parquet"  # beside an index: the raw catalog it embedded (the service's attribute filters)


@dataclass
class LoadedModel:
    """A verified model artifact: the rebuilt towers plus what they were trained with."""

    version: str
    directory: Path
    manifest: dict[str, Any]
    model: TwoTower

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def catalog(self) -> pd.DataFrame:
        """The catalog the model was trained with (item_id index, raw feature columns)."""
        return pd.read_parquet(self.directory / CATALOG).set_index("item_id")

    def users(self) -> pd.DataFrame:
        """Training users: user_id index, raw feature columns and `history` (item ids, newest first)."""
        return pd.read_parquet(self.directory / USERS).set_index("user_id")

    def item_embeddings(self) -> tuple[list[str], np.ndarray]:
        ids = json.loads((self.directory / ITEM_IDS).read_text())
        return ids, np.load(self.directory / ITEM_EMBEDDINGS, allow_pickle=False)


def save_model(
    store: ArtifactStore,
    model: TwoTower,
    *,
    catalog: pd.DataFrame,
    users: pd.DataFrame | pa.Table,
    item_embeddings: np.ndarray,
    training: dict[str, Any],
    metrics: dict[str, Any],
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    version: str | None = None,
) -> Path:
    """Write `models/<version>/` atomically and return its path.

    `catalog` (item_id index) and `users` (user_id index, or a user_id column in an Arrow table; with a `history`
    column) are the raw tables the model was trained with, kept so the re-index job and the feature loader work
    from the artifact alone.
    `extra_files` maps a file name to a writer (e.g. the curves plot)."""
    version = version or new_version()
    if len(catalog) != len(item_embeddings):
        raise ArtifactError(f"{len(catalog)} catalog items but {len(item_embeddings)} item embeddings")
    with publishing(store.model_dir(version)) as tmp:
        save_file(model.user_tower.state_dict(), tmp / USER_TOWER)
        save_file(model.item_tower.state_dict(), tmp / ITEM_TOWER)
        write_json(tmp / VOCABULARIES, model.vocabs.to_dict())
        write_json(tmp / ITEM_IDS, [str(i) for i in catalog.index])
        np.save(tmp / ITEM_EMBEDDINGS, np.ascontiguousarray(item_embeddings, dtype=np.float32))
        catalog.rename_axis("item_id").reset_index().to_parquet(tmp / CATALOG, index=False)
        if isinstance(users, pa.Table):
            pq.write_table(users, tmp / USERS)
        else:
            users.rename_axis("user_id").reset_index().to_parquet(tmp / USERS, index=False)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        write_manifest(
            tmp,
            {
                "kind": "model",
                "version": version,
                "metric": METRIC,
                "normalize": model.config.normalize,
                "dim": model.config.dim,
                "tower_config": model.config.to_dict(),
                "feature_spec": model.spec.to_dict(),
                "vocab_hash": model.vocabs.digest(),
                "vocab_sizes": model.vocabs.sizes(),
                "item_count": len(catalog),
                "training": training,
                "metrics": metrics,
            },
        )
    return store.model_dir(version)


def _vocabularies(directory: Path, manifest: dict[str, Any]) -> Vocabularies:
    vocabs = Vocabularies.from_dict(json.loads((directory / VOCABULARIES).read_text()))
    if vocabs.digest() != manifest["vocab_hash"]:
        raise ArtifactError(f"{directory / VOCABULARIES} does not hash to the manifest's vocab_hash")
    return vocabs


def load_vocabularies(directory: Path) -> Vocabularies:
    """A model artifact's vocabularies alone (verified like `load_model`'s), without rebuilding its towers."""
    return _vocabularies(directory, read_manifest(directory, "model"))


def load_model(directory: Path) -> LoadedModel:
    """Rebuild the towers from the manifest alone and load their weights (strict), verifying checksums,
    vocabularies and shapes; any mismatch is an `ArtifactError` naming the file."""
    manifest = read_manifest(directory, "model")
    if manifest.get("metric") != METRIC:
        raise ArtifactError(f"{directory / MANIFEST}: metric {manifest.get('metric')!r} != {METRIC!r}")
    vocabs = _vocabularies(directory, manifest)
    try:
        config = TowerConfig.from_dict(manifest["tower_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: cannot rebuild the towers: {e}") from e
    model = TwoTower(FeatureSpec.from_dict(manifest["feature_spec"]), vocabs, config)
    for name, module in ((USER_TOWER, model.user_tower), (ITEM_TOWER, model.item_tower)):
        try:
            weights = load_file(directory / name)
        except (SafetensorError, OSError) as e:  # a damaged header, a truncated file
            raise ArtifactError(f"{directory / name} is not a readable safetensors file: {e}") from e
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"{directory / name} does not fit the manifest's towers: {e}") from e
        bad = sorted(key for key, tensor in weights.items() if not bool(tensor.isfinite().all()))
        if bad:
            raise ArtifactError(f"{directory / name} holds non-finite values (NaN or infinite) in {bad}")
    model.eval()
    loaded = LoadedModel(str(manifest["version"]), directory, manifest, model)
    ids, vectors = loaded.item_embeddings()
    if not np.isfinite(vectors).all():
        raise ArtifactError(f"{directory / ITEM_EMBEDDINGS} holds non-finite values (NaN or infinite)")
    if vectors.shape != (len(ids), config.dim):
        raise ArtifactError(
            f"{directory / ITEM_EMBEDDINGS}: shape {vectors.shape} != ({len(ids)}, {config.dim}) from the manifest"
        )
    return loaded
