"""The quality benchmark's closed-form peer (EASE) on planted data: it must rank like a real recommender, and its
rank-r approximation must be exact at full rank, or the ceilings it reports beside the two-tower mean nothing."""

from __future__ import annotations

from benchmarks.quality import ease
from training.dataset import Dataset, split_random
from training.evaluate import Protocol


def test_ease_beats_popularity_and_its_full_rank_svd_is_exact(tiny_dataset: Dataset) -> None:
    train, test = split_random(tiny_dataset.interactions, 0.2, seed=0)
    popularity = Protocol(list(tiny_dataset.items.index), train, test).popularity(train)

    full, truncated, lambdas = ease(tiny_dataset, train, test, seed=0, rank=len(tiny_dataset.items))

    assert full.ndcg > 1.5 * popularity.ndcg
    assert lambdas["lambda"] == lambdas["lambda_rank"]  # the same scores on validation at full rank
    # equal up to float near-ties (one swapped hit moves the mean by ~1e-4 here)
    assert abs(truncated.ndcg - full.ndcg) < 1e-3 and abs(truncated.recall - full.recall) < 1e-3


def test_ease_truncation_keeps_the_planted_clusters_only_with_enough_rank(tiny_dataset: Dataset) -> None:
    train, test = split_random(tiny_dataset.interactions, 0.2, seed=0)
    full, rank_16, _ = ease(tiny_dataset, train, test, seed=0, rank=16)
    _, rank_2, _ = ease(tiny_dataset, train, test, seed=0, rank=2)

    assert rank_16.ndcg > 0.9 * full.ndcg  # 6 planted clusters fit in 16 dimensions
    assert rank_2.ndcg < 0.75 * full.ndcg  # but not in 2
