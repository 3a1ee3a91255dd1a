"""Offline evaluation on the DESIGN §4 protocol: full ranking over the catalog through an exact FAISS
inner-product index, each user's training items excluded, P@10 / R@10 / NDCG@10 averaged over test users.
`evaluate` scores a trained model on a split; the trainer's validation passes use the same `Protocol`.

Every model is evaluated by handing user and item vectors to `rank_top_k`: the two-tower model with its tower
outputs, the popularity baseline as the 1-d vectors (1) and (count), implicit ALS with its factors. So the
same exact index, exclusion and metric code scores them all, and what is scored is what the service ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.dataset import Dataset, Interactions, UserItems
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
    ndcg_se: float  # standard error of `ndcg`, the mean over users: how far another sample of users could move it

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
    se = float(np.std(ndcg, ddof=1) / np.sqrt(len(ndcg))) if len(ndcg) > 1 else math.nan
    return RankingMetrics(
        float(np.mean(hits / k)), float(np.mean(hits / sizes)), float(np.mean(ndcg)), len(ndcg), k, ndcg_se=se
    )


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


def rank_dense(scores: np.ndarray, seen: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """(U, k) positions of the highest of dense (U, I) scores, best first, each row's `seen` positions excluded
    (-1 where fewer than k are left). `scores` is overwritten."""
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    if len(rows):
        scores[rows, np.concatenate(seen)] = -np.inf
    kk = min(k, scores.shape[1])
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top = np.where(np.isneginf(np.take_along_axis(scores, top, axis=1)), -1, top)
    return np.pad(top, ((0, 0), (0, k - kk)), constant_values=-1)


class Protocol:
    """The split's users and items as positions: who is evaluated, what each has seen, what each should find.

    Users are those with held-out rows, all of them or, with `max_users`, a seeded sample of them (large data: the
    metrics are then an estimate over that many users, and say how many). Item positions are catalog codes."""

    def __init__(self, train: Interactions, test: Interactions, max_users: int | None = None, seed: int = 0) -> None:
        self.item_ids, self.user_ids = train.item_ids, train.user_ids
        wanted = test.by_user()
        rows = np.arange(len(wanted))
        if max_users is not None and len(rows) > max_users:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_users, replace=False))
        self.users = wanted.users[rows]  # (U,) user codes, ascending
        self.history = train.by_user()  # the users' training items, newest first: their history and what is seen
        self.history_rows = self.history.rows_of(self.users)  # (U,) row in `history`, -1 for none
        self.seen = [
            self.history.of(r).astype(np.int64) if r >= 0 else np.zeros(0, np.int64) for r in self.history_rows
        ]
        self.relevant = [set(wanted.of(r).tolist()) for r in rows]

    def score(self, user_vectors: np.ndarray, item_vectors: np.ndarray, k: int = 10) -> RankingMetrics:
        """Rank all catalog items for every test user through an exact inner-product index."""
        index = exact_index(item_vectors, list(self.item_ids), model_version="evaluation")
        return ranking_metrics(rank_top_k(index, user_vectors, self.seen, k), self.relevant, k)

    def score_dense(
        self, scores_of: Callable[[np.ndarray], np.ndarray], k: int = 10, chunk: int = 1024
    ) -> RankingMetrics:
        """Metrics of a model that scores every item directly rather than by a low-dimensional inner product (EASE):
        `scores_of(rows)` gives the (len(rows), I) scores of the protocol's users at those positions; ranked
        `chunk` users at a time, each user's seen items excluded."""
        tops = []
        for start in range(0, len(self.users), chunk):
            rows = np.arange(start, min(start + chunk, len(self.users)))
            tops.append(rank_dense(scores_of(rows), [self.seen[r] for r in rows], k))
        top = np.concatenate(tops) if tops else np.zeros((0, k), dtype=np.int64)
        return ranking_metrics(top, self.relevant, k)

    def popularity(self, train: Interactions, k: int = 10) -> RankingMetrics:
        """The popularity baseline: score(u, i) = training count of i, as a 1-d inner product."""
        counts = train.item_counts().astype(np.float32)
        return self.score(np.ones((len(self.users), 1), np.float32), counts[:, None], k)

    def encode_users(self, dataset: Dataset, vocabs: Vocabularies, catalog_vocab_ids: np.ndarray) -> EncodedUsers:
        """The protocol's users for the user tower: features from the dataset, history their training items
        (newest first, as many as the spec keeps). `catalog_vocab_ids[p]` is catalog item p's vocabulary index
        (`encode_item_frame(...).ids`), so histories are encoded from codes by the same vocabulary."""
        spec = dataset.spec
        frame = dataset.users.reindex(pd.Index(self.user_ids[self.users], dtype=object))
        encoded = encode_user_frame(spec, vocabs, frame, [[] for _ in range(len(self.users))])
        encoded.history[:] = history_array(self.history, self.history_rows, catalog_vocab_ids, spec.max_history)
        return encoded


def history_array(grouped: UserItems, rows: np.ndarray, lookup: np.ndarray, width: int) -> np.ndarray:
    """(len(rows), width) int64: row i holds lookup[items] of `grouped` row rows[i], its first `width` items (newest
    first), zero-padded; rows of -1 are all padding."""
    rows = np.asarray(rows, dtype=np.int64)
    valid = rows >= 0
    starts = np.where(valid, grouped.indptr[np.maximum(rows, 0)], 0)
    lengths = np.where(valid, np.minimum(grouped.indptr[np.maximum(rows, 0) + 1] - starts, width), 0)
    out = np.zeros((len(rows), width), dtype=np.int64)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row_of, offset] = lookup[grouped.items[np.repeat(starts, lengths) + offset]]
    return out


def evaluate(
    model: TwoTower, dataset: Dataset, train: Interactions, test: Interactions, max_users: int | None = None
) -> RankingMetrics:
    """Test metrics (DESIGN §4): users' histories are their training items; those items are excluded."""
    protocol = Protocol(train, test, max_users)
    items = encode_item_frame(dataset.spec, model.vocabs, dataset.items)
    users = protocol.encode_users(dataset, model.vocabs, items.ids)
    return protocol.score(embed_users(model, users), embed_items(model, items))
