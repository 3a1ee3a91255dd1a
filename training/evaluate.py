"""Offline evaluation on the DESIGN §4 protocol: full ranking over the catalog through an exact FAISS
inner-product index, each user's training items excluded, P@10 / R@10 / NDCG@10 averaged over test users.

Every model is evaluated by handing user and item vectors to `rank_top_k`: the two-tower model with its tower
outputs, the popularity baseline as the 1-d vectors (1) and (count), implicit ALS with its factors. So the
same exact index, exclusion and metric code scores them all, and what is scored is what the service ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.index import ItemIndex, build_index


@dataclass(frozen=True)
class RankingMetrics:
    precision: float
    recall: float
    ndcg: float
    users: int
    k: int

    def as_dict(self) -> dict[str, float]:
        k = self.k
        return {
            f"precision@{k}": self.precision,
            f"recall@{k}": self.recall,
            f"ndcg@{k}": self.ndcg,
            "users": self.users,
        }


def ranking_metrics(top: np.ndarray, relevant: Sequence[set[int]], k: int = 10) -> RankingMetrics:
    """Metrics of ranked item positions `top` (U, >=k) against each user's relevant positions.

    P@k = hits/k, R@k = hits/|relevant|, NDCG@k with binary gains, log2(rank+1) discount and the ideal DCG over
    min(|relevant|, k) hits. Users without relevant items are skipped (they have nothing to find)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    precision, recall, ndcg = [], [], []
    for row, rel in zip(top[:, :k], relevant, strict=True):
        if not rel:
            continue
        gains = np.fromiter((p in rel for p in row), dtype=np.float64, count=k)
        hits = gains.sum()
        precision.append(hits / k)
        recall.append(hits / len(rel))
        ndcg.append(float(gains @ discounts) / discounts[: min(len(rel), k)].sum())
    return RankingMetrics(float(np.mean(precision)), float(np.mean(recall)), float(np.mean(ndcg)), len(ndcg), k)


def rank_top_k(index: ItemIndex, user_vectors: np.ndarray, seen: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """(U, k) item positions ranked by the index, each user's `seen` positions excluded (over-fetch, then filter)."""
    fetch = min(len(index), k + max((len(s) for s in seen), default=0))
    _, positions = index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), fetch)
    top = np.full((len(user_vectors), k), -1, dtype=np.int64)
    for row, (ranked, excluded) in enumerate(zip(positions, seen, strict=True)):
        kept = ranked[(ranked >= 0) & ~np.isin(ranked, excluded)][:k]
        top[row, : len(kept)] = kept
    return top


class Protocol:
    """The split's users and items as positions: who is evaluated, what each has seen, what each should find."""

    def __init__(self, item_ids: Sequence[str], train: pd.DataFrame, test: pd.DataFrame) -> None:
        self.item_ids = list(item_ids)
        position = {item: i for i, item in enumerate(self.item_ids)}
        missing = set(test.item_id) - position.keys()
        if missing:
            raise ValueError(f"{len(missing)} test items are not in the catalog, e.g. {sorted(missing)[:3]}")
        self.users: list[str] = sorted(set(test.user_id))
        seen = train.groupby("user_id").item_id.agg(list)
        wanted = test.groupby("user_id").item_id.agg(list)
        self.seen = [
            np.array([position[i] for i in seen.get(u, []) if i in position], dtype=np.int64) for u in self.users
        ]
        self.relevant = [{position[i] for i in wanted[u]} for u in self.users]

    def score(self, user_vectors: np.ndarray, item_vectors: np.ndarray, k: int = 10) -> RankingMetrics:
        """Rank all catalog items for every test user through an exact inner-product index."""
        index, _ = build_index(
            item_vectors,
            self.item_ids,
            recipe="Flat",
            model_version="evaluation",
            progress=False,
            measure_speed=False,
        )
        return ranking_metrics(rank_top_k(index, user_vectors, self.seen, k), self.relevant, k)

    def popularity(self, train: pd.DataFrame, k: int = 10) -> RankingMetrics:
        """The popularity baseline: score(u, i) = training count of i, as a 1-d inner product."""
        counts = train.item_id.value_counts().reindex(self.item_ids, fill_value=0).to_numpy(np.float32)
        return self.score(np.ones((len(self.users), 1), np.float32), counts[:, None], k)
