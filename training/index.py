"""The FAISS item index: build it, measure and tune its recall against exact search, save, load, search.

Shared by the offline side (`training.reindex` builds and publishes indexes, `training.evaluate` searches the
exact one) and the service (loads an index beside its towers and searches it). Owns:

- recipes: FAISS factory strings (`Flat`, `HNSW32`, `IVF1265,Flat`, `IVF4000,SQ8`, `IVF4000,PQ16`, ...) and
  `choose_recipe`, which picks one from the catalog size, the dimension and the recall target;
- `ItemIndex`: a FAISS index whose ids are positions into `item_ids`, plus the float32 item vectors
  (memory-mapped once loaded) used for exact re-scoring, filtered exact search and item-to-item similarity;
- `build_index`: train + add, then recall@k measured against exact inner-product search, the search
  parameter (`nprobe` / `efSearch`, and `k_factor` for compressed recipes) tuned to the smallest value meeting
  the target, and single-query latency measured; `RecallTargetError` when no parameter meets it (the caller
  must not publish);
- `save_index` / `load_index`: the `indexes/<version>/` artifact (`index.faiss`, `item_ids.json`,
  `item_vectors.npy`, `manifest.json` through `training.artifacts`), checked on load for checksums, metric,
  dim, item count and the model version it was built from.

The metric is inner product everywhere (DESIGN §3): training scores `dot(user, item)`, so every index here is
built with `METRIC_INNER_PRODUCT` and every score it returns equals that dot product to float tolerance.
Recipes whose stored codes are approximate (SQ8, PQ, any pre-transform) are searched for `k * k_factor`
candidates which are then re-scored exactly against the stored item vectors: the returned ranking is the one
training would produce on those candidates, never an approximation of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from training import artifacts
from training.artifacts import ArtifactError, VersionMismatchError

__all__ = [
    "METRIC",
    "ItemIndex",
    "RecallTargetError",
    "build_index",
    "choose_recipe",
    "exact_topk",
    "load_index",
    "measure_latency",
    "nlist_for",
    "recall_at_k",
    "save_index",
    "set_threads",
]

METRIC = artifacts.METRIC  # the one metric of the project, defined with the artifact contract
INDEX_FILE = "index.faiss"
ITEM_IDS_FILE = "item_ids.json"
VECTORS_FILE = "item_vectors.npy"

# Below this many items an exact scan costs well under a millisecond per query on one core, so an approximate
# index would buy little latency and cost recall, tuning and a training step.
FLAT_MAX_ITEMS = 20_000
# IVF-Flat keeps a float32 copy of every vector in RAM. Past this budget the automatic choice switches to a
# compressed IVF (1 byte/dim with SQ8, then 0.25 byte/dim with PQ); the full vectors stay on disk,
# memory-mapped, and are read only for the few candidates that get re-scored.
DEFAULT_MEMORY_BUDGET_MB = 2048
# k-means quality saturates at a few dozen points per centroid (FAISS asks for >= 39); training on every item
# would make IVF training dominate a re-index of a large catalog. At 1M items IVF4000,Flat builds in ~16 s on
# this 2-core machine (k-means on 160k points x 10 iterations, then assigning all 1M); FAISS's defaults (256
# points per centroid x 25 iterations) would do ~16x the k-means work. The floor covers PQ codebooks (256
# centroids x 39 points).
TRAIN_POINTS_PER_CENTROID = 40
MIN_TRAIN_POINTS = 10_000
KMEANS_ITERATIONS = 10
PQ_POINTS_PER_CENTROID = 64
ADD_CHUNK = 65_536
# Candidates per result re-scored exactly for compressed recipes: the largest value tried while tuning.
K_FACTOR_GRID = (1, 2, 4, 8, 16, 32)
DEFAULT_K_FACTOR = 8
EVAL_QUERIES = 1_000
LATENCY_QUERIES = 300
LATENCY_BATCH = 32


class RecallTargetError(RuntimeError):
    """No search parameter lets the index reach the recall target; the index must not be published.

    `report` holds what was measured (recipe, every parameter tried with its recall, the best reached)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def set_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count for this process.

    A service answering many concurrent single-user requests should use 1: one query is too small to split,
    and OpenMP teams from several request threads would oversubscribe the cores. Batch jobs keep all cores."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = faiss.omp_get_max_threads()
    set_threads(n)
    try:
        yield
    finally:
        set_threads(previous)


def nlist_for(n_items: int) -> int:
    """IVF list count for a catalog: about 4·sqrt(N), balancing the centroid scan against the list scans."""
    return max(1, round(4 * math.sqrt(n_items)))


def choose_recipe(
    n_items: int,
    dim: int,
    recall_target: float = 0.95,
    *,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> str:
    """Pick a factory string from the catalog size, the dimension and the recall target.

    - `Flat` (exact) when the target demands exactness (>= 1.0) or the catalog is small (< FLAT_MAX_ITEMS).
    - `IVF{4·sqrt(N)},Flat` while the float32 vectors fit the memory budget: exact scores, a cheap k-means
      build (a re-index must stay well within minutes), and `nprobe` trades latency for recall smoothly.
      HNSW is available by factory string but not chosen: on this machine, at 1M items and recall@10 0.95,
      HNSW32 took 112 s to build and 253 µs per query against IVF's 16 s and 43 µs (benchmarks/index.py),
      and its graph costs memory on top of the vectors.
    - `IVF{nlist},SQ8` (4x smaller) and then `IVF{nlist},PQ{dim/4}` (16x smaller) beyond the budget, both
      re-scored exactly on their top `k * k_factor` candidates.

    The choice is a starting point; `build_index` measures the recall and refuses an index that misses it.
    """
    if n_items < 1 or dim < 1:
        raise ValueError(f"need a positive item count and dim, got n_items={n_items}, dim={dim}")
    if recall_target >= 1.0 or n_items < FLAT_MAX_ITEMS:
        return "Flat"
    nlist = nlist_for(n_items)
    budget = memory_budget_mb * 2**20
    if n_items * dim * 4 <= budget:
        return f"IVF{nlist},Flat"
    if n_items * dim <= budget or dim % 4 != 0:
        return f"IVF{nlist},SQ8"
    return f"IVF{nlist},PQ{dim // 4}"


def _as_matrix(x: Any, dim: int | None, name: str) -> np.ndarray:
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
        q = _as_matrix(user_vectors, self.dim, "user_vectors")  # (B, D)
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
        q = _as_matrix(user_vectors, self.dim, "user_vectors")  # (B, D)
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
        _as_matrix(queries, None, "queries"),
        _as_matrix(vectors, None, "vectors"),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return scores, positions


def recall_at_k(positions: np.ndarray, exact_positions: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k found in the approximate top-k ((B, k) arrays)."""
    if positions.shape != exact_positions.shape:
        raise ValueError(f"shape {positions.shape} != exact shape {exact_positions.shape}")
    hits = (positions[:, :, None] == exact_positions[:, None, :]) & (positions[:, :, None] >= 0)  # (B, k, k)
    return float(hits.any(axis=2).sum() / exact_positions.size)


def _validate_recipe(recipe: str) -> str:
    recipe = recipe.replace(" ", "")
    if "IDMap" in recipe:
        raise ValueError(f"recipe {recipe!r}: FAISS ids are positions into item_ids here; leave IDMap out")
    return recipe


def _train_and_add(x: np.ndarray, recipe: str, *, progress: bool, seed: int) -> faiss.Index:
    n, dim = x.shape
    try:
        index = faiss.index_factory(dim, recipe, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"recipe {recipe!r} is not a valid FAISS factory string: {e}") from e
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if ivf.nlist > n:
            raise ValueError(f"recipe {recipe!r} has {ivf.nlist} lists for only {n} items; use fewer lists")
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = seed
        if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            ivfpq: Any = faiss.downcast_index(ivf)
            # Polysemous training (a code re-ordering for Hamming pre-filtering, never used here) and the
            # sub-quantizers' k-means at FAISS's defaults (25 iterations, up to 65k points each; slow for
            # 4-d sub-spaces) were most of IVF-PQ's build time; codes are re-scored exactly anyway.
            ivfpq.do_polysemous_training = False
            ivfpq.pq.cp.niter = KMEANS_ITERATIONS
            ivfpq.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    if not index.is_trained:
        n_lists = ivf.nlist if ivf is not None else 1
        size = min(n, max(TRAIN_POINTS_PER_CENTROID * n_lists, MIN_TRAIN_POINTS))
        rng = np.random.default_rng(seed)
        sample = x if size >= n else x[np.sort(rng.choice(n, size=size, replace=False))]
        index.train(sample)
    with tqdm(total=n, unit="item", desc=f"index {recipe}", disable=not progress) as bar:
        for start in range(0, n, ADD_CHUNK):
            chunk = x[start : start + ADD_CHUNK]
            index.add(chunk)
            bar.update(len(chunk))
    return index


def _eval_queries(x: np.ndarray, queries: Any, n_queries: int, seed: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed + 1)
    if queries is not None:
        q = _as_matrix(queries, x.shape[1], "queries")
        if len(q) > n_queries:
            q = q[np.sort(rng.choice(len(q), size=n_queries, replace=False))]
        return q, "given"
    # Without user-tower outputs, stand-in queries are item vectors nudged off themselves, so that they follow
    # the catalog's distribution but are not stored points.
    sample = x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)]
    noise = rng.standard_normal(sample.shape).astype(np.float32) * (0.25 * x[: 10 * n_queries].std(axis=0))
    return np.ascontiguousarray(sample + noise, dtype=np.float32), "perturbed_items"


def _default_grid(index: faiss.Index, search_param: str | None, k: int) -> list[int]:
    if search_param == "nprobe":
        nlist = int(faiss.extract_index_ivf(index).nlist)
        return sorted({min(2**i, nlist) for i in range(nlist.bit_length() + 1)})
    if search_param == "efSearch":
        return [2**i for i in range(max(4, (k - 1).bit_length()), 13)]  # 16 (or >= k) .. 4096
    return []


def _tune(
    item_index: ItemIndex, q: np.ndarray, exact: np.ndarray, k: int, target: float, grid: Sequence[int]
) -> tuple[dict[str, int] | None, float, list[dict[str, Any]]]:
    """Smallest search parameter meeting the target, or None: scan the grid upwards, then bisect below the
    first value that passes.

    Recall grows with nprobe (a superset of lists holds a superset of candidates) and, in practice, with
    efSearch, so the first passing value bounds the answer and bisection from the last failure finds it."""
    trials: list[dict[str, Any]] = []

    def recall(**params: int) -> float:
        item_index.set_params(**params)
        value = recall_at_k(item_index.search(q, k)[1], exact)
        trials.append({**item_index.params, "recall": round(value, 5)})
        return value

    fixed: dict[str, int] = {} if item_index.exact_scores else {"k_factor": max(K_FACTOR_GRID)}
    name = item_index.search_param
    best: tuple[dict[str, int], float] | None = None
    if name is None:
        value = recall(**fixed)
        if value >= target:
            best = (dict(fixed), value)
    else:
        # largest value known to fail; an HNSW search with efSearch < k can return fewer than k items (padded
        # with -1), so bisection never goes below k there
        lo = k - 1 if name == "efSearch" else 0
        for value_p in sorted(set(grid)):
            r = recall(**fixed, **{name: value_p})
            if r >= target:
                hi, hi_r = value_p, r
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    r_mid = recall(**fixed, **{name: mid})
                    if r_mid >= target:
                        hi, hi_r = mid, r_mid
                    else:
                        lo = mid
                best = ({**fixed, name: hi}, hi_r)
                break
            lo = value_p
    if best is not None and not item_index.exact_scores:
        # Then the fewest candidates to re-score at that setting (fewer vector reads per query).
        params = dict(best[0])
        for k_factor in K_FACTOR_GRID:
            r = best[1] if k_factor == params["k_factor"] else recall(**{**params, "k_factor": k_factor})
            if r >= target:
                best = ({**params, "k_factor": k_factor}, r)
                break
    if best is None:
        return None, max((t["recall"] for t in trials), default=0.0), trials
    item_index.set_params(**best[0])
    return best[0], best[1], trials


def measure_latency(
    item_index: ItemIndex,
    queries: np.ndarray,
    k: int = 10,
    *,
    n_single: int = LATENCY_QUERIES,
    batch: int = LATENCY_BATCH,
) -> dict[str, float | int]:
    """Single-query latency p50/p99 (µs, one FAISS thread, through `ItemIndex.search` as serving calls it) and
    batch throughput (queries/s with `batch` queries per call, all threads)."""
    q = _as_matrix(queries, item_index.dim, "queries")
    singles = q[: max(1, min(n_single, len(q)))]
    times = np.empty(len(singles), dtype=np.float64)
    with _threads(1):
        for row in singles[: min(10, len(singles))]:  # warm caches and lazily mapped pages
            item_index.search(row[None, :], k)
        for i, row in enumerate(singles):
            t0 = time.perf_counter_ns()
            item_index.search(row[None, :], k)
            times[i] = (time.perf_counter_ns() - t0) / 1e3
    n_batches = max(1, len(q) // batch)
    batches = [q[i * batch : (i + 1) * batch] for i in range(n_batches)]
    item_index.search(batches[0], k)
    start = time.perf_counter()
    for b in batches:
        item_index.search(b, k)
    elapsed = time.perf_counter() - start
    return {
        "p50_us": float(np.percentile(times, 50)),
        "p99_us": float(np.percentile(times, 99)),
        f"qps_b{batch}": float(sum(len(b) for b in batches) / elapsed),
        "batch_threads": faiss.omp_get_max_threads(),
    }


def _index_memory_mb(index: faiss.Index) -> float:
    return float(len(faiss.serialize_index(index)) / 2**20)


def build_index(
    vectors: Any,
    item_ids: Sequence[str],
    recipe: str = "auto",
    recall_target: float = 0.95,
    queries: Any = None,
    k: int = 10,
    *,
    model_version: str,
    progress: bool = True,
    param_grid: Sequence[int] | None = None,
    n_eval_queries: int = EVAL_QUERIES,
    measure_speed: bool = True,
    seed: int = 0,
) -> tuple[ItemIndex, dict[str, Any]]:
    """Build an inner-product index over (N, D) item vectors, measure its recall@k and tune it.

    `queries` are real query vectors (user-tower outputs) when available; otherwise perturbed item vectors
    stand in. The search parameter is set to the smallest value (from `param_grid`, default powers of two,
    refined by bisection) whose recall@k against exact search meets `recall_target`; `RecallTargetError` if
    none does. Returns the index and a report: recipe, params, recall@k, p50_us, p99_us, qps_b32, build_s,
    memory_mb and every trial.
    """
    x = _as_matrix(vectors, None, "vectors")  # (N, D)
    n, dim = x.shape
    if len(item_ids) != n:
        raise ValueError(f"{len(item_ids)} item ids for {n} vectors")
    if n == 0:
        raise ValueError("cannot index an empty catalog")
    if len(set(item_ids)) != n:
        raise ValueError(f"item ids are not unique ({n - len(set(item_ids))} duplicates)")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"item vector {bad} (item {item_ids[bad]!r}) is not finite")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    recipe = _validate_recipe(choose_recipe(n, dim, recall_target) if recipe == "auto" else recipe)

    start = time.perf_counter()
    index = _train_and_add(x, recipe, progress=progress, seed=seed)
    build_s = time.perf_counter() - start
    item_index = ItemIndex(index, item_ids, x, recipe=recipe, model_version=model_version)

    q, query_source = _eval_queries(x, queries, n_eval_queries, seed)
    _, exact = exact_topk(x, q, k)  # (Q, k)
    start = time.perf_counter()
    grid = list(param_grid) if param_grid is not None else _default_grid(index, item_index.search_param, k)
    params, recall, trials = _tune(item_index, q, exact, k, recall_target, grid)
    report: dict[str, Any] = {
        "recipe": recipe,
        "params": params if params is not None else {},
        "metric": METRIC,
        "items": n,
        "dim": dim,
        "k": k,
        f"recall@{k}": recall,
        "recall_target": recall_target,
        "eval_queries": len(q),
        "query_source": query_source,
        "build_s": build_s,
        "tune_s": time.perf_counter() - start,
        "memory_mb": _index_memory_mb(index),
        "trials": trials,
    }
    if params is None:
        raise RecallTargetError(
            f"recipe {recipe!r} reaches recall@{k} {recall:.4f} at best against exact search on {len(q)} "
            f"queries, below the target {recall_target}; tried {trials}",
            report,
        )
    if measure_speed:
        report.update(measure_latency(item_index, q, k))
    return item_index, report


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
        raise ArtifactError(f"index {version} dim {dim} != model dim {expected_dim}")
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
    item_index = ItemIndex(
        index,
        item_ids,
        vectors,
        recipe=manifest["recipe"],
        model_version=manifest["model_version"],
        params=manifest.get("params") or {},
    )
    return item_index, manifest
