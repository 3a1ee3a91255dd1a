"""The one metric definition (DESIGN §4) against hand-computed values, and the exact ranking with each user's
training items excluded against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluate import rank_top_k, ranking_metrics
from training.index import exact_index


def test_metrics_match_hand_computed_values() -> None:
    top = np.array([[3, 1, 7], [4, 2, 0], [5, -1, -1]])
    relevant = [{1, 9}, set(), {5}]  # the second user has nothing to find and is skipped

    metrics = ranking_metrics(top, relevant, k=3)

    # user 1: one hit at rank 2 of 2 relevant; user 3: its only relevant item at rank 1 (then nothing left)
    ndcg_1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert metrics.users == 2
    assert metrics.precision == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert metrics.recall == pytest.approx((1 / 2 + 1) / 2)
    assert metrics.ndcg == pytest.approx((ndcg_1 + 1.0) / 2)
    # the sample standard deviation of the two users' NDCG, over the square root of their number
    assert metrics.ndcg_se == pytest.approx(abs(1.0 - ndcg_1) / math.sqrt(2) / math.sqrt(2))


def test_ranking_excludes_seen_items_exactly_like_brute_force() -> None:
    rng = np.random.default_rng(0)
    items, users = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    # seen sets from empty to all but 3 items (fewer than k left: the rest of the row is -1), so the deep second
    # search round is needed for the heavy users
    seen = [rng.choice(60, size=size, replace=False) for size in rng.integers(0, 20, size=37)]
    seen += [rng.choice(60, size=57, replace=False), np.arange(60), np.zeros(0, np.int64)]
    index = exact_index(items, [str(i) for i in range(60)])

    top = rank_top_k(index, users, seen, k=10)

    scores = users @ items.T
    for row, excluded in enumerate(seen):
        ranked = [i for i in np.argsort(-scores[row], kind="stable") if i not in set(excluded.tolist())][:10]
        assert top[row].tolist() == ranked + [-1] * (10 - len(ranked))
