"""Building an index for a catalog: recipe choice, train + add, recall@k measured against exact search, the
search parameter tuned to a recall target, and latency measured; `RecallTargetError` when no parameter meets the
target (the caller must not publish).

Offline only (`training.reindex` and the index benchmark); the service loads what was built, through
`training.index`. Recipes are FAISS factory strings (`Flat`, `HNSW32`, `IVF1265,Flat`, `IVF4000,SQ8`,
`IVF4000,PQ16`, ...); `choose_recipe` picks one from the catalog size, the dimension and the recall target.
What each recipe costs to build and search is measured by `benchmarks/index.py` (results in
`benchmarks/results/index.json`, discussed in docs/performance.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from training.index import METRIC, ItemIndex, as_matrix, exact_topk, faiss_threads

# Below this many items an exact scan costs well under a millisecond per query on one core, so an approximate
# index would buy little latency and cost recall, tuning and a training step.
FLAT_MAX_ITEMS = 20_000
# IVF-Flat keeps a float32 copy of every vector in RAM. Past this budget the automatic choice switches to a
# compressed IVF (1 byte/dim with SQ8, then 0.25 byte/dim with PQ); the full vectors stay on disk,
# memory-mapped, and are read only for the few candidates that get re-scored.
DEFAULT_MEMORY_BUDGET_MB = 2048
# k-means quality saturates at a few dozen points per centroid (FAISS asks for >= 39); training on every item
# would make IVF training dominate a re-index of a large catalog, and FAISS's defaults (256 points per centroid
# x 25 iterations) do about 16x the k-means work of these. The floor covers PQ codebooks (256 centroids x 39
# points).
TRAIN_POINTS_PER_CENTROID = 40
MIN_TRAIN_POINTS = 10_000
KMEANS_ITERATIONS = 10
PQ_POINTS_PER_CENTROID = 64
ADD_CHUNK = 65_536
# Candidates per result re-scored exactly for compressed recipes, tried while tuning.
K_FACTOR_GRID = (1, 2, 4, 8, 16, 32)
EVAL_QUERIES = 1_000
LATENCY_QUERIES = 300
LATENCY_BATCH = 32


class RecallTargetError(RuntimeError):
    """No search parameter lets the index reach the recall target; the index must not be published.

    `report` holds what was measured (recipe, every parameter tried with its recall, the best reached)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


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
      HNSW is available by factory string but not chosen: at a million items and recall@10 0.95 it built
      several times slower and searched slower than IVF in `benchmarks/index.py` (docs/performance.md), and its
      graph costs memory on top of the vectors.
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
            # sub-quantizers' k-means at FAISS's defaults (25 iterations, up to 65k points each) dominate IVF-PQ's
            # build time and buy nothing here: codes are re-scored exactly anyway.
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
        q = as_matrix(queries, x.shape[1], "queries")
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
    q = as_matrix(queries, item_index.dim, "queries")
    singles = q[: max(1, min(n_single, len(q)))]
    times = np.empty(len(singles), dtype=np.float64)
    with faiss_threads(1):
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
    x = as_matrix(vectors, None, "vectors")  # (N, D)
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
