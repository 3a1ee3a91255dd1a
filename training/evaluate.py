"""Offline evaluation on the DESIGN §4 protocol: full ranking over the catalog through an exact FAISS
inner-product index, each user's training items excluded, P@10 / R@10 / NDCG@10 averaged over test users.
`evaluate` scores a trained model on a split; the trainer's validation passes use the same `Protocol`.

Every model is evaluated by handing user and item vectors to `rank_top_k`: the two-tower model with its tower
outputs, the popularity baseline as the 1-d vectors (1) and (count), implicit ALS with its factors. So the
same exact index, exclusion and metric code scores them all, and what is scored is what the service ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.dataset import Dataset, histories
from training.features import EncodedUsers, Vocabularies, encode_item_frame, encode_user_frame
from training.index import ItemIndex, exact_index
from training.model import TwoTower, embed_items, embed_users


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


def _contains(sets: Sequence[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """(U, n) bool: is positions[u, j] in sets[u] (negative positions never are). One search over sorted
    (row, position) keys, so no (U, catalog) mask is built: catalogs go to millions of items."""
    members = np.concatenate([np.zeros(0, np.int64), *(np.asarray(s, np.int64) for s in sets)])
    if not len(members):
        return np.zeros(positions.shape, dtype=bool)
    width = int(max(positions.max(initial=0), members.max())) + 1
    keys = np.sort(np.repeat(np.arange(len(sets), dtype=np.int64), [len(s) for s in sets]) * width + members)
    wanted = np.arange(len(sets), dtype=np.int64)[:, None] * width + positions
    return (positions >= 0) & (keys[np.searchsorted(keys, wanted).clip(max=len(keys) - 1)] == wanted)


def ranking_metrics(top: np.ndarray, relevant: Sequence[set[int]], k: int = 10) -> RankingMetrics:
    """Metrics of ranked item positions `top` (U, >=k) against each user's relevant positions.

    P@k = hits/k, R@k = hits/|relevant|, NDCG@k with binary gains, log2(rank+1) discount and the ideal DCG over
    min(|relevant|, k) hits. Users without relevant items are skipped (they have nothing to find)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    sizes = np.array([len(r) for r in relevant], dtype=np.int64)
    gains = _contains([np.fromiter(r, np.int64, len(r)) for r in relevant], top[:, :k])[sizes > 0].astype(np.float64)
    sizes = sizes[sizes > 0]
    hits = gains.sum(axis=1)
    ideal = np.cumsum(discounts)[np.minimum(sizes, k) - 1]
    ndcg = (gains @ discounts) / ideal
    return RankingMetrics(float(np.mean(hits / k)), float(np.mean(hits / sizes)), float(np.mean(ndcg)), len(ndcg), k)


def rank_top_k(index: ItemIndex, user_vectors: np.ndarray, seen: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """(U, k) item positions ranked by the index, each user's `seen` positions excluded (-1 where fewer than k
    are left). A user's top k unseen items are among its top k + |seen|, so that depth is exact; it is fetched in
    two rounds, one deep enough for 90% of the users and a deeper one for the rows the first left short,
    because FAISS takes one depth per call and the heaviest user would otherwise set it for everyone."""
    vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
    counts = np.array([len(s) for s in seen], dtype=np.int64)
    top = np.full((len(vectors), k), -1, dtype=np.int64)
    rows = np.arange(len(vectors))
    for quantile in (0.9, 1.0):
        if not len(rows):
            break
        fetch = min(len(index), k + int(np.quantile(counts, quantile, method="higher")))
        _, positions = index.search(vectors[rows], fetch)
        dropped = (positions < 0) | _contains([seen[r] for r in rows.tolist()], positions)
        done = ((~dropped).sum(axis=1) >= k) | (fetch >= np.minimum(len(index), k + counts[rows]))
        first = np.argsort(dropped[done], axis=1, kind="stable")[:, :k]  # the first k kept, in rank order
        top[rows[done], : first.shape[1]] = np.where(
            np.take_along_axis(dropped[done], first, axis=1), -1, np.take_along_axis(positions[done], first, axis=1)
        )
        rows = rows[~done]
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
        index = exact_index(item_vectors, self.item_ids, model_version="evaluation")
        return ranking_metrics(rank_top_k(index, user_vectors, self.seen, k), self.relevant, k)

    def popularity(self, train: pd.DataFrame, k: int = 10) -> RankingMetrics:
        """The popularity baseline: score(u, i) = training count of i, as a 1-d inner product."""
        counts = train.item_id.value_counts().reindex(self.item_ids, fill_value=0).to_numpy(np.float32)
        return self.score(np.ones((len(self.users), 1), np.float32), counts[:, None], k)


def encode_protocol_users(
    vocabs: Vocabularies, dataset: Dataset, users: Sequence[str], history_rows: pd.DataFrame
) -> EncodedUsers:
    """`users` with their features from the dataset and, as history, their items in `history_rows` (newest first)."""
    hist = histories(history_rows)
    return encode_user_frame(dataset.spec, vocabs, dataset.users.reindex(list(users)), [hist.get(u, []) for u in users])


def evaluate(model: TwoTower, dataset: Dataset, train: pd.DataFrame, test: pd.DataFrame) -> RankingMetrics:
    """Test metrics (DESIGN §4): users' histories are their training items; those items are excluded."""
    protocol = Protocol(list(dataset.items.index), train, test)
    users = encode_protocol_users(model.vocabs, dataset, protocol.users, train)
    items = encode_item_frame(dataset.spec, model.vocabs, dataset.items)
    return protocol.score(embed_users(model, users), embed_items(model, items))
