"""The quality benchmark's peers on planted data: EASE's two ways of solving it give the dense solution, it ranks
like a real recommender, and its rank-r approximation is exact at full rank; ALS's grid search follows its best
setting past the grid's edges, rank and regularisation together. Otherwise the ceilings it reports beside the
two-tower mean nothing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from benchmarks.peers import ALS_CAPACITY, ALS_EXTENSIONS, ALS_GRID, ALS_STEPS, Ease, ease, extended_grid_search, matrix
from training.dataset import Dataset, split_random, synthetic
from training.evaluate import Protocol


def _dense_ease(x: np.ndarray, lam: float) -> np.ndarray:
    """The textbook solution: B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹."""
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p / np.diag(p)


def test_ease_in_user_space_equals_the_dense_item_space_solution() -> None:
    wide = synthetic(n_users=60, n_items=200, n_clusters=4, interactions_per_user=8, seed=1).interactions
    x = matrix(wide)
    assert x.shape[0] < x.shape[1]  # fewer users than items: the push-through path
    users = np.arange(x.shape[0])
    expected = x.toarray() @ _dense_ease(x.toarray(), 30.0)
    fast = Ease(x, 30.0)
    assert not fast.item_space
    np.testing.assert_allclose(fast.scores(users), expected, rtol=1e-6, atol=1e-8)
    tall = Ease(matrix(synthetic(n_users=200, n_items=60, n_clusters=4, seed=1).interactions), 30.0)
    assert tall.item_space
    m = np.random.default_rng(0).standard_normal((200, 5))
    b = _dense_ease(x.toarray(), 30.0)
    np.testing.assert_allclose(fast.b_times(m), b @ m, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fast.bt_times(m), b.T @ m, rtol=1e-6, atol=1e-8)


def test_ease_beats_popularity_and_its_full_rank_truncation_is_exact(tiny_dataset: Dataset) -> None:
    train, test = split_random(tiny_dataset.interactions, 0.2, seed=0)
    protocol = Protocol(train, test)
    popularity = protocol.popularity(train)

    full, truncated, lambdas = ease(train, test, seed=0, rank=len(tiny_dataset.items), protocol=protocol)

    assert full.ndcg > 1.5 * popularity.ndcg
    assert lambdas["lambda"] == lambdas["lambda_rank"]  # the same scores on validation at full rank
    # equal up to float near-ties (one swapped hit moves the mean by ~1e-4 here)
    assert abs(truncated.ndcg - full.ndcg) < 1e-3 and abs(truncated.recall - full.recall) < 1e-3


def test_ease_truncation_keeps_the_planted_clusters_only_with_enough_rank(tiny_dataset: Dataset) -> None:
    train, test = split_random(tiny_dataset.interactions, 0.2, seed=0)
    protocol = Protocol(train, test)
    full, rank_16, _ = ease(train, test, seed=0, rank=16, protocol=protocol)
    _, rank_2, _ = ease(train, test, seed=0, rank=2, protocol=protocol)

    assert rank_16.ndcg > 0.9 * full.ndcg  # 6 planted clusters fit in 16 dimensions
    assert rank_2.ndcg < 0.75 * full.ndcg  # but not in 2


def test_a_merged_rerun_replaces_only_its_own_rows_and_adds_new_datasets() -> None:
    from benchmarks.quality import merged

    earlier = [{"dataset": "a", "rows": [{"model": "softmax", "ndcg@10": 0.4}, {"model": "triplet", "ndcg@10": 0.2}]}]
    now = [
        {"dataset": "a", "rows": [{"model": "triplet", "ndcg@10": 0.3, "measured": "2026-12-02"}]},
        {"dataset": "b", "rows": [{"model": "triplet", "ndcg@10": 0.1}]},
    ]
    out = merged(earlier, now)
    assert [d["dataset"] for d in out] == ["a", "b"]
    assert {r["model"]: r["ndcg@10"] for r in out[0]["rows"]} == {"softmax": 0.4, "triplet": 0.3}
    assert out[1]["rows"] == now[1]["rows"]


def test_a_merged_run_on_other_seeds_adds_its_runs_to_the_row() -> None:
    from benchmarks.quality import merged, summary_row

    def run(seed: int, ndcg: float) -> dict[str, float]:
        return {"seed": seed, "ndcg@10": ndcg, "recall@10": ndcg / 2, "precision@10": ndcg / 3, "train_seconds": 1.0}

    earlier = [{"dataset": "a", "rows": [summary_row("ALS", [run(0, 0.2)])]}]
    later = summary_row("ALS", [run(1, 0.3), run(2, 0.4)])
    [dataset] = merged(earlier, [{"dataset": "a", "rows": [later]}])
    [row] = dataset["rows"]
    assert row["seeds"] == [0, 1, 2] and row["ndcg@10"] == pytest.approx(0.3)
    assert row["ndcg@10_std"] == pytest.approx(np.std([0.2, 0.3, 0.4]))
    again = summary_row("ALS", [run(1, 0.5)])  # a seed it has: the rerun replaces that seed's run only
    [dataset] = merged([dataset], [{"dataset": "a", "rows": [again]}])
    [row] = dataset["rows"]
    assert row["seeds"] == [0, 1, 2] and row["ndcg@10"] == pytest.approx((0.2 + 0.5 + 0.4) / 3)


def test_als_search_moves_rank_and_regularisation_together_past_the_grid() -> None:
    """Planted: up to 512 factors the best regularisation is 0.01, beyond it 1000x more per doubling, and the optimum
    is 1024 factors at regularisation 10, outside the initial grid in both. One setting at a time, the search stops
    at 512 (1024 at 0.01 is worse); with each regularisation tried beside a new number of factors it gets there."""

    def score(params: dict[str, Any]) -> float:
        factors, reg = math.log2(params["factors"]), math.log10(params["regularization"])
        wanted_reg = -2 + 3 * max(0.0, factors - 9)
        return (
            -0.05 * (factors - 10) ** 2 - 0.05 * (reg - wanted_reg) ** 2 - 0.01 * (math.log2(params["alpha"]) - 3) ** 2
        )

    alone, _, _ = extended_grid_search(score, ALS_GRID, ALS_STEPS, ALS_EXTENSIONS)
    assert (alone["factors"], alone["regularization"]) == (512, 0.01)
    found, value, tried = extended_grid_search(score, ALS_GRID, ALS_STEPS, ALS_EXTENSIONS, ALS_CAPACITY)
    assert found == {"factors": 1024, "regularization": 10.0, "alpha": 10.0}
    assert value == pytest.approx(score(found))
    assert tried > math.prod(len(v) for v in ALS_GRID.values())  # the grid itself, and its extensions
