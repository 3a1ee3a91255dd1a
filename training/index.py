"""The FAISS item index as both sides use it: `ItemIndex` (search, exact re-scoring, filtered exact search,
item-to-item similarity), the exact index evaluation ranks with, and the `indexes/<version>/` artifact.

Shared by the offline side (`training.reindex` saves what `training.index_build` built, `training.evaluate` ranks
through `exact_index`) and the service (loads an index beside its towers and searches it).

- `ItemIndex`: a FAISS index whose ids are positions into `item_ids`, plus the float32 item vectors
  (memory-mapped once loaded) used for exact re-scoring, filtered exact search and item-to-item similarity;
- `save_index` / `load_index`: `index.faiss`, `item_ids.json`, `item_vectors.npy` and `manifest.json` (through
  `training.artifacts`), checked on load for checksums, metric, dim, item count and the model version it was
  built from.

The metric is inner product everywhere (DESIGN §3): training scores `dot(user, item)`, so every index is
built with `METRIC_INNER_PRODUCT` and every score it returns equals that dot product to float tolerance.
Recipes whose stored codes are approximate (SQ8, PQ, any pre-transform) are searched for `k * k_factor`
candidates which are then re-scored exactly against the stored item vectors: the returned ranking is the one
training would produce on those candidates, never an approximation of it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from training import artifacts
from training.artifacts import ArtifactError, VersionMismatchError

METRIC = artifacts.METRIC  # the one metric of the project, defined with the artifact contract
INDEX_FILE = "index.faiss"
ITEM_IDS_FILE = "item_ids.json"
VECTORS_FILE = "item_vectors.npy"
# Candidates per result re-scored exactly for compressed recipes, until tuning sets it.
DEFAULT_K_FACTOR = 8


def set_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count for this process.

    A service answering many concurrent single-user requests should use 1: one query is too small to split,
    and OpenMP teams from several request threads would oversubscribe the cores. Batch jobs keep all cores."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)


@contextlib.contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's thread count set to `n` inside the block, restored after."""
    previous = faiss.omp_get_max_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(previous)


def as_matrix(x: Any, dim: int | None, name: str) -> np.ndarray:
    """(N, D) float32 C-contiguous, as FAISS requires; copies only when the input isn't already that."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dim {arr.shape[1]} but the index has dim {dim}")
    return arr


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of (B, S) scores, best first; padded with (-inf, -1) when S < k."""
    b, s = scores.shape
    kk = min(k, s)
    if kk == 0:
        return np.full((b, k), -np.inf, dtype=np.float32), np.full((b, k), -1, dtype=np.int64)
    if s > 4096 and kk < s:
        # Many columns (a large filtered subset): partition first, then sort only the k survivors.
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        cols = np.take_along_axis(part, order, axis=1)
    else:
        # Re-scored candidates (k * k_factor columns): one sort is cheaper than several numpy calls.
        cols = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    top = np.take_along_axis(scores, cols, axis=1).astype(np.float32, copy=False)
    if kk == k:
        return top, cols.astype(np.int64, copy=False)
    pad = ((0, 0), (0, k - kk))
    return np.pad(top, pad, constant_values=-np.inf), np.pad(cols, pad, constant_values=-1).astype(np.int64)


def _is_inner_product(index: faiss.Index) -> bool:
    # Derived from the index itself: a similarity metric (larger is better) and exactly inner product.
    similarity = bool(faiss.is_similarity_metric(index.metric_type))  # type: ignore[attr-defined]
    return similarity and index.metric_type == faiss.METRIC_INNER_PRODUCT


def _search_param(index: faiss.Index) -> str | None:
    """The parameter that trades latency for recall, derived from the index itself rather than its recipe."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def _returns_exact_scores(index: faiss.Index) -> bool:
    """True when the index scores candidates with the stored float32 vectors (its scores are dot products).

    Deliberately a short list: anything else (SQ, PQ, pre-transforms, refine wrappers) is re-scored."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat | faiss.IndexIVFFlat | faiss.IndexHNSWFlat)


class ItemIndex:
    """A searchable item catalog: FAISS index + item ids + float32 item vectors + the tuned search parameters.

    FAISS ids are positions into `item_ids` (and rows of `item_vectors`): the index is built by adding vectors
    in catalog order, so no id map is stored inside FAISS. `search` and friends return positions; map them to
    ids with `item_ids[p]` (p == -1 means fewer than k results).

    Thread safety: `search` only reads and may be called from several threads; `set_params` mutates the FAISS
    index and belongs to loading, before the index is shared.
    """

    def __init__(
        self,
        index: faiss.Index,
        item_ids: Sequence[str],
        item_vectors: np.ndarray,
        *,
        recipe: str,
        model_version: str,
        params: Mapping[str, int] | None = None,
    ) -> None:
        if not _is_inner_product(index):
            raise ArtifactError(
                f"index metric_type {index.metric_type} is not inner product ({faiss.METRIC_INNER_PRODUCT}); "
                "the towers score by dot product, so it would rank differently"
            )
        if item_vectors.ndim != 2 or item_vectors.dtype != np.float32:
            raise ArtifactError(
                f"item vectors must be a 2-D float32 array, got {item_vectors.dtype} {item_vectors.shape}"
            )
        n, dim = item_vectors.shape
        if index.d != dim:
            raise ArtifactError(f"index dim {index.d} != item vector dim {dim}")
        if not (index.ntotal == n == len(item_ids)):
            raise ArtifactError(
                f"index holds {index.ntotal} vectors, item_vectors {n} rows, item_ids {len(item_ids)} ids; "
                "they must be the same catalog"
            )
        self.index = index
        self.item_ids: list[str] = list(item_ids)
        self.item_vectors = item_vectors  # (N, D), possibly a read-only memmap
        self.recipe = recipe
        self.model_version = model_version
        self.search_param = _search_param(index)
        self.exact_scores = _returns_exact_scores(index)
        self.params: dict[str, int] = {}
        self._positions: dict[str, int] | None = None
        self._dim = int(index.d)  # read per search: a SWIG attribute read costs microseconds
        defaults: dict[str, int] = {} if self.exact_scores else {"k_factor": DEFAULT_K_FACTOR}
        if self.search_param == "nprobe":
            defaults["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
        elif self.search_param == "efSearch":
            hnsw_index: Any = faiss.downcast_index(index)
            defaults["efSearch"] = int(hnsw_index.hnsw.efSearch)
        self.set_params(**{**defaults, **(params or {})})

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        return (
            f"ItemIndex(recipe={self.recipe!r}, items={len(self)}, dim={self.dim}, "
            f"params={self.params}, model_version={self.model_version!r})"
        )

    def set_params(self, **params: int) -> None:
        """Set search parameters: `nprobe` (IVF), `efSearch` (HNSW), `k_factor` (re-scored recipes)."""
        allowed = {self.search_param} if self.search_param else set()
        if not self.exact_scores:
            allowed.add("k_factor")
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(
                f"unknown search parameter(s) {sorted(unknown)} for recipe {self.recipe!r}; "
                f"it accepts {sorted(allowed)}"
            )
        for name, value in params.items():
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if name != "k_factor":
                faiss.ParameterSpace().set_index_parameter(self.index, name, int(value))
            self.params[name] = int(value)

    def search(self, user_vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product for each row of (B, D) user vectors.

        Returns (scores (B, k) float32, positions (B, k) int64), best first; where fewer than k items are
        found the tail holds position -1 and score -inf. Scores equal `user · item_vectors[position]`."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = as_matrix(user_vectors, self.dim, "user_vectors")  # (B, D)
        if self.exact_scores:
            scores, positions = self.index.search(q, k)  # (B, k), (B, k)
            scores[positions < 0] = -np.inf  # FAISS pads with -FLT_MAX; -inf cannot be mistaken for a score
            return scores, positions
        _, candidates = self.index.search(q, k * self.params["k_factor"])  # (B, k * k_factor)
        return self._rescore(q, candidates, k)

    def _rescore(self, q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = candidates >= 0  # (B, C)
        vectors = np.asarray(self.item_vectors[np.where(valid, candidates, 0)])  # (B, C, D)
        scores = np.matmul(vectors, q[:, :, None])[:, :, 0]  # (B, C)
        if not valid.all():
            scores[~valid] = -np.inf
        top_scores, cols = _topk(scores, k)  # cols are always < C here, as C >= k
        positions = np.take_along_axis(candidates, cols, axis=1)
        positions[np.isneginf(top_scores)] = -1
        return top_scores, positions

    def exact_search_subset(self, user_vectors: Any, positions_subset: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among a subset of items (e.g. those passing an attribute filter).

        For filters too selective for the ANN index to return k survivors: dot products over the subset only.
        Returns (scores (B, k) float32, positions (B, k) int64): global positions, padded with (-inf, -1)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = as_matrix(user_vectors, self.dim, "user_vectors")  # (B, D)
        subset = np.asarray(positions_subset, dtype=np.int64).ravel()  # (S,)
        if subset.size and (subset.min() < 0 or subset.max() >= len(self)):
            raise ValueError(f"positions_subset must lie in [0, {len(self)}), got {subset.min()}..{subset.max()}")
        scores = q @ np.asarray(self.item_vectors[subset]).T  # (B, S)
        top_scores, cols = _topk(scores, k)
        return top_scores, np.where(cols >= 0, subset[np.maximum(cols, 0)] if subset.size else -1, -1)

    def vector(self, position: int) -> np.ndarray:
        """The (D,) float32 vector of the item at `position` (a copy, safe to keep)."""
        return np.array(self.item_vectors[position], dtype=np.float32)

    def similar(self, position: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Items most similar to the item at `position` by the same inner product, excluding the item itself.

        Returns (scores (k,), positions (k,)): searches k + 1 and drops the item (or the last if absent)."""
        scores, positions = self.search(self.vector(position)[None, :], k + 1)
        keep = positions[0] != position
        if keep.all():
            keep[-1] = False
        return scores[0][keep][:k], positions[0][keep][:k]

    def positions_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Positions of the given ids (int64), -1 for ids not in the catalog."""
        if self._positions is None:
            self._positions = {item_id: i for i, item_id in enumerate(self.item_ids)}
        return np.array([self._positions.get(i, -1) for i in item_ids], dtype=np.int64)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k, the reference every index is measured against: (scores, positions)."""
    scores, positions = faiss.knn(
        as_matrix(queries, None, "queries"),
        as_matrix(vectors, None, "vectors"),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return scores, positions


def exact_index(vectors: Any, item_ids: Sequence[str], model_version: str = "unpublished") -> ItemIndex:
    """An exact (flat) inner-product index over (N, D) item vectors: what evaluation ranks with, and the reference
    every approximate index is measured against. Nothing to train or tune."""
    x = as_matrix(vectors, None, "vectors")  # (N, D)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return ItemIndex(index, item_ids, x, recipe="Flat", model_version=model_version)


def _core_manifest(item_index: ItemIndex, report: Mapping[str, Any], version: str) -> dict[str, Any]:
    k = int(report.get("k", 10))
    return {
        "kind": "index",
        "version": version,
        "model_version": item_index.model_version,
        "recipe": item_index.recipe,
        "params": dict(item_index.params),
        "metric": METRIC,
        "dim": item_index.dim,
        "item_count": len(item_index),
        "recall_k": k,
        f"recall@{k}": report.get(f"recall@{k}"),
        "recall_target": report.get("recall_target"),
        "recall_queries": {"count": report.get("eval_queries"), "source": report.get("query_source")},
        "latency": {key: report[key] for key in ("p50_us", "p99_us", "qps_b32", "batch_threads") if key in report},
        "build_s": report.get("build_s"),
        "memory_mb": report.get("memory_mb"),
    }


def save_index(
    item_index: ItemIndex,
    directory: Path,
    report: Mapping[str, Any] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    *,
    version: str | None = None,
) -> dict[str, Any]:
    """Write an index artifact and return its manifest.

    If `directory` does not exist it is published atomically (written beside it, then `os.replace`d). If it
    exists without a manifest (the temporary directory of the caller's own `artifacts.publishing()` block,
    e.g. the re-index job adding `items.parquet`), the files are written into it and the manifest is written
    last, checksumming every file present, so write extra files first. `version` defaults to the dir name.
    """
    directory = Path(directory)
    version = version or directory.name
    if version.startswith("."):
        raise ValueError(f"pass version= explicitly when writing into the temporary directory {directory}")
    core = _core_manifest(item_index, report or {}, version)
    clash = set(core) & set(extra_manifest or {})
    if clash:
        raise ValueError(f"extra_manifest may not override {sorted(clash)}; they are measured here")
    manifest = {**(extra_manifest or {}), **core}

    def write(target: Path) -> dict[str, Any]:
        if (target / artifacts.MANIFEST).exists():
            raise ArtifactError(f"{target} already holds a manifest; artifacts are immutable")
        faiss.write_index(item_index.index, str(target / INDEX_FILE))
        artifacts.write_json(target / ITEM_IDS_FILE, item_index.item_ids)
        np.save(target / VECTORS_FILE, np.ascontiguousarray(item_index.item_vectors), allow_pickle=False)
        return artifacts.write_manifest(target, manifest)

    if directory.exists():
        return write(directory)
    with artifacts.publishing(directory) as tmp:
        return write(tmp)


def load_index(
    directory: Path,
    expected_model_version: str | None = None,
    expected_dim: int | None = None,
) -> tuple[ItemIndex, dict[str, Any]]:
    """Load and verify an index artifact; returns (ItemIndex with its tuned params restored, manifest).

    Refuses (ArtifactError) corrupted or missing files, a metric other than inner product, a dim or item
    count that disagrees with the manifest, and (VersionMismatchError) an index built from another model's
    item tower.
    Item vectors are memory-mapped: only the rows that get re-scored or looked up are paged in."""
    directory = Path(directory)
    manifest = artifacts.read_manifest(directory, "index")
    version = manifest.get("version", directory.name)
    if expected_model_version is not None and manifest.get("model_version") != expected_model_version:
        raise VersionMismatchError(
            f"index {version} was built from model {manifest.get('model_version')!r} but the loaded model is "
            f"{expected_model_version!r}; re-index with that model's item tower"
        )
    if manifest.get("metric") != METRIC:
        raise ArtifactError(f"index {version} has metric {manifest.get('metric')!r}, not {METRIC!r}")
    dim = int(manifest["dim"])
    if expected_dim is not None and dim != expected_dim:
        raise ArtifactError(f"{directory / artifacts.MANIFEST} says dim {dim}, but the model's dim is {expected_dim}")
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as e:
        raise ArtifactError(f"{directory / INDEX_FILE} is not a readable FAISS index: {e}") from e
    if not _is_inner_product(index):
        raise ArtifactError(
            f"{directory / INDEX_FILE} has metric_type {index.metric_type}, not inner product "
            f"({faiss.METRIC_INNER_PRODUCT}), though its manifest says {manifest.get('metric')!r}"
        )
    if index.d != dim:
        raise ArtifactError(f"{directory / INDEX_FILE} dim {index.d} != manifest dim {dim}")
    if index.ntotal != manifest["item_count"]:
        raise ArtifactError(
            f"{directory / INDEX_FILE} holds {index.ntotal} vectors != manifest item_count {manifest['item_count']}"
        )
    try:
        item_ids = json.loads((directory / ITEM_IDS_FILE).read_text())
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"index {version} in {directory} is unreadable: {e}") from e
    if not all(np.isfinite(vectors[i : i + 65536]).all() for i in range(0, len(vectors), 65536)):
        raise ArtifactError(f"{directory / VECTORS_FILE} holds non-finite values (NaN or infinite)")
    item_index = ItemIndex(
        index,
        item_ids,
        vectors,
        recipe=manifest["recipe"],
        model_version=manifest["model_version"],
        params=manifest.get("params") or {},
    )
    return item_index, manifest
