"""The retriever: top-k items for users, and items similar to an item, from the serving pair it holds. A plain
class with an explicit lifecycle and no HTTP or Redis in it (`service.recommender` and the routes own those).

Lifecycle: `Retriever(artifacts_root)` is cheap (`ready` is False) -> `load()` has `service.pair.load_pair` read
and check the active index and the model it names, then swaps the new pair in, with an empty answer cache, by
replacing ONE reference -> `recommend()` / `similar()` serve. Each call reads that reference once, so a batch in
flight finishes on the pair it started with while a new one is swapped in; a load that fails raises and leaves
the old pair serving.

`recommend(queries)`, for a batch:
1. each query is checked against the pair (a user feature the model does not take is a 422 naming it);
2. each row's user vector: remembered (below), or the SAME encoding training used and the served user tower,
   one forward for all the rows that need one;
3. each row without a remembered answer gets a plan: the index positions it leaves out (seen items, explicit
   excludes), its attribute-filter mask, and how many candidates it needs so that k survive those;
4. ONE index search for those rows, as deep as the deepest plan; each row keeps its first k candidates that pass;
   a row whose candidates run out first is answered by exact search over exactly the items that pass its filters.
`prepare(queries)` does steps 1-3 and returns a `PreparedBatch`, whose `search()` (step 4's search, which holds
the GIL only to enter and leave FAISS) a caller may run in another thread before it takes the answers.
Scores are the model's: dot(user, item).

What does not depend on the request is not redone per request. `AnswerCache` (one per pair) keys what was
derived from a stored user record by the user id and the record's `revision`, a digest of its content
(`service.store.StoredUser`): the user vector, the index positions of the seen items and, when the query asks for
nothing beyond leaving those out, the top-k per k. A changed record has another revision, so a remembered answer
is always the one the search would give (same vector, same excluded items, same index). The cold user (no
features, no history, no known id) has one vector per pair and its top-k per k.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.errors import InvalidInputError, NotReadyError, UnknownItemError
from service.pair import ServingPair, load_pair
from training.artifacts import ArtifactStore
from training.index import ItemIndex

log = logging.getLogger(__name__)

RecommendationPath = Literal["known_user", "features_only", "cold_start"]

# Candidates fetched per wanted item when a filter passes a fraction f of the catalog: k / f * OVERFETCH.
OVERFETCH = 2.0
# The batch's single search never asks for more candidates than this; rows it cannot fill go exact.
MAX_FETCH = 4096
# Stored user records whose derived values a pair remembers (oldest dropped first).
CACHE_SIZE = 10_000
# Answers remembered per record: up to this many distinct k, each at most this deep (bounds the cache's memory:
# 10,000 records x 2 answers x 100 items x 12 bytes = 24 MB at worst).
ANSWERS_PER_RECORD = 2
MAX_REMEMBERED_K = 100

_NO_POSITIONS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class UserQuery:
    """One user to recommend for: what is known of them (stored data merged with the request's) and the ask."""

    user_id: str | None = None
    features: Mapping[str, Any] = field(default_factory=dict)
    history: Sequence[str] = ()  # item ids, newest first (capped: the tower's input)
    seen: Collection[str] = ()  # every item the store knows the user had, beyond the capped history too
    k: int = 10
    exclude: Collection[str] = ()
    exclude_seen: bool = True
    filter: Mapping[str, Collection[str]] | None = None
    stored: bool = False  # the store had data for this user
    # Feature names the caller sent: these must be the model's (422 otherwise); stored extras are ignored.
    given_features: Collection[str] = ()
    # The revision of the stored record this query's features, history and seen items are, unchanged (None when
    # the request added any): what was derived from that record may be reused.
    record_revision: str | None = None


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[str]
    scores: list[float]
    path: RecommendationPath
    model_version: str
    index_version: str
    exact_fallback: bool = False


@dataclass(frozen=True)
class SimilarItems:
    item_id: str
    item_ids: list[str]
    scores: list[float]
    model_version: str
    index_version: str


# --------------------------------------------------------------------------- the answer cache


@dataclass(frozen=True)
class Answer:
    item_ids: tuple[str, ...]
    scores: np.ndarray  # (k,) float32
    exact_fallback: bool


@dataclass
class Derived:
    """What one user record gives under one pair: its vector, the positions it excludes as seen, and its answers."""

    vector: np.ndarray  # (D,) the user tower's output
    seen: np.ndarray  # index positions of the record's history and seen items
    # k -> the answer when exactly the seen items are left out and nothing else is asked (no excludes, no filter)
    answers: dict[int, Answer] = field(default_factory=dict)


class AnswerCache:
    """Per pair: user id -> (record revision, `Derived`), at most `max_records` (oldest dropped first), and the cold
    user's `Derived`. Thread-safe: the batch endpoint runs the retriever in worker threads."""

    def __init__(self, cold_vector: np.ndarray, max_records: int) -> None:
        self.cold = Derived(cold_vector, _NO_POSITIONS)
        self.max_records = max_records
        self._records: dict[str, tuple[str, Derived]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, user_id: str, revision: str) -> Derived | None:
        entry = self._records.get(user_id)
        return entry[1] if entry is not None and entry[0] == revision else None

    def remember(self, user_id: str, revision: str, derived: Derived) -> None:
        if self.max_records <= 0:
            return
        with self._lock:
            if user_id not in self._records and len(self._records) >= self.max_records:
                del self._records[next(iter(self._records))]  # the oldest entry
            self._records[user_id] = (revision, derived)

    @staticmethod
    def keep_answer(derived: Derived, k: int, answer: Answer) -> None:
        if k <= MAX_REMEMBERED_K and len(derived.answers) < ANSWERS_PER_RECORD:
            derived.answers.setdefault(k, answer)


@dataclass(frozen=True)
class _Plan:
    excluded: set[int]  # index positions never returned for this row
    mask: np.ndarray | None  # (N,) items passing the row's attribute filter; None: no filter
    fetch: int  # candidates this row needs from the search
    remember_in: Derived | None  # where to keep the answer (only when exactly the seen items are left out)


@dataclass
class PreparedBatch:
    """A batch `Retriever.prepare` checked and planned: its rows' vectors, the answers remembered, the plans of the
    rows still to search. `search()` runs the batch's ONE index search; FAISS holds the GIL only to enter and
    leave it, so a caller may run it in a worker thread while its event loop serves on. `recommendations()`
    picks each planned row's answer from what the search found (searching first if that has not run)."""

    pair: ServingPair
    queries: Sequence[UserQuery]
    vectors: np.ndarray  # (B, D)
    answers: list[Answer | None]
    plans: dict[int, _Plan]
    _found: tuple[np.ndarray, np.ndarray, int] | None = None  # scores, positions, depth of the search

    @property
    def rows_to_search(self) -> int:
        return len(self.plans)

    def search(self) -> None:
        """ONE index search for the planned rows, as deep as the deepest needs (each search pays the coarse
        quantizer again, so one deep search beats several shallow ones)."""
        if not self.plans or self._found is not None:
            return
        rows = list(self.plans)
        fetch = max(plan.fetch for plan in self.plans.values())
        vectors = self.vectors if len(rows) == len(self.queries) else self.vectors[rows]
        scores, positions = self.pair.index.search(vectors, fetch)
        self._found = (scores, positions, fetch)

    def recommendations(self) -> list[Recommendation]:
        if self._found is None:
            self.search()
        pair, answers = self.pair, self.answers
        if self._found is not None:
            scores, positions, fetch = self._found
            for row, i in enumerate(self.plans):
                plan, k = self.plans[i], self.queries[i].k
                picked = _pick(pair.index, self.vectors[i], scores[row], positions[row], fetch, k, plan)
                if plan.remember_in is not None:
                    AnswerCache.keep_answer(plan.remember_in, k, picked)
                answers[i] = picked
        vocab = pair.model.model.vocabs.user_ids
        out = []
        for query, answer in zip(self.queries, answers, strict=True):
            assert answer is not None
            known = query.user_id is not None and (query.stored or query.user_id in vocab)
            path: RecommendationPath = (
                "known_user" if known else "features_only" if query.features or query.history else "cold_start"
            )
            out.append(
                Recommendation(
                    item_ids=list(answer.item_ids),
                    scores=answer.scores.tolist(),
                    path=path,
                    model_version=pair.model_version,
                    index_version=pair.index_version,
                    exact_fallback=answer.exact_fallback,
                )
            )
        return out


# --------------------------------------------------------------------------- the retriever


class Retriever:
    """Serves recommendations from one loaded (model, index) pair, swapped atomically on `load()`."""

    def __init__(
        self,
        artifacts_root: Path,
        *,
        overfetch: float = OVERFETCH,
        max_fetch: int = MAX_FETCH,
        user_tower: Literal["numpy", "torch"] = "numpy",
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if overfetch < 1 or max_fetch < 1 or cache_size < 0:
            raise ValueError(
                f"need overfetch >= 1, max_fetch >= 1 and cache_size >= 0, got {overfetch}, {max_fetch}, {cache_size}"
            )
        self.artifacts = ArtifactStore(Path(artifacts_root))
        self.overfetch = overfetch
        self.max_fetch = max_fetch
        self.user_tower = user_tower
        self.cache_size = cache_size
        self._served: tuple[ServingPair, AnswerCache] | None = None
        self._load_lock = threading.Lock()  # one load at a time; serving never takes it

    # ---- lifecycle

    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def current(self) -> ServingPair | None:
        """The pair serving now, or None before the first load."""
        served = self._served
        return served[0] if served is not None else None

    @property
    def cache(self) -> AnswerCache | None:
        """The answer cache of the pair serving now (None before the first load)."""
        served = self._served
        return served[1] if served is not None else None

    def _serving(self) -> tuple[ServingPair, AnswerCache]:
        """The pair serving now and its cache. Read ONCE per call and used throughout."""
        served = self._served
        if served is None:
            raise NotReadyError(
                f"no model/index pair is loaded yet: publish an index under {self.artifacts.root} "
                "(`twotower reindex`) and wait for /readyz"
            )
        return served

    def load(self, index_version: str | None = None) -> ServingPair:
        """Load `index_version` (default: the ACTIVE_INDEX pointer) and the model it names, check them, and swap.

        Raises NotReadyError when nothing is published, ArtifactError (VersionMismatchError for a pair from
        different training runs) when the artifacts are refused; the previous pair then keeps serving."""
        with self._load_lock:
            version = index_version or self.artifacts.active_index()
            if version is None:
                raise NotReadyError(
                    f"no active index under {self.artifacts.root}: run `twotower reindex` to build and publish one"
                )
            pair = load_pair(self.artifacts, version, self.user_tower)
            # The swap: one reference; calls holding the old pair finish on it.
            self._served = (pair, AnswerCache(pair.cold_vector, self.cache_size))
            log.info(
                "serving index %s (%d items, %s) with model %s",
                pair.index_version,
                len(pair.index),
                pair.index.recipe,
                pair.model_version,
            )
            return pair

    # ---- recommendations

    def recommend(self, queries: Sequence[UserQuery]) -> list[Recommendation]:
        """Top-k for each query (see the module docstring). Raises InvalidInputError located at
        `(query_index, field...)` for input the loaded model cannot take."""
        return self.prepare(queries).recommendations()

    def prepare(self, queries: Sequence[UserQuery]) -> PreparedBatch:
        """Steps 1-3 of `recommend` for a batch: checked, vectors and remembered answers found, the other rows
        planned. What is left is the batch's one search and the answers (`PreparedBatch`). Raises
        InvalidInputError like `recommend`."""
        pair, cache = self._serving()
        if not queries:
            return PreparedBatch(pair, queries, np.zeros((0, pair.index.dim), np.float32), [], {})
        self._check(pair, queries)
        derived = self._derive(pair, cache, queries)
        answers: list[Answer | None] = []
        plans: dict[int, _Plan] = {}
        for i, (query, d) in enumerate(zip(queries, derived, strict=True)):
            plain = query.exclude_seen and not query.exclude and not query.filter  # asks for nothing but unseen
            answers.append(d.answers.get(query.k) if plain else None)
            if answers[i] is None:
                try:
                    plans[i] = self._plan(pair, query, d, plain)
                except InvalidInputError as e:
                    raise e.at(i) from e
        return PreparedBatch(pair, queries, np.stack([d.vector for d in derived]), answers, plans)

    @staticmethod
    def _check(pair: ServingPair, queries: Sequence[UserQuery]) -> None:
        known = set(pair.user_feature_names)
        for i, query in enumerate(queries):
            unknown = sorted(set(query.given_features) - known)
            if unknown:
                raise InvalidInputError(
                    f"unknown user feature {unknown[0]!r}; model {pair.model_version} takes {sorted(known)}",
                    (i, "features", unknown[0]),
                    unknown[0],
                )

    def _derive(self, pair: ServingPair, cache: AnswerCache, queries: Sequence[UserQuery]) -> list[Derived]:
        """Each row's `Derived`: the cache's where it holds the row's record (or the row is the cold user), else
        computed (one tower forward for all of those) and remembered when the row is exactly a stored record."""
        config, vocab = pair.model.model.config, pair.model.model.vocabs.user_ids
        found: list[Derived | None] = []
        for query in queries:
            cold = not query.features and not query.history and not query.seen
            if cold and (not config.use_user_id or query.user_id is None or query.user_id not in vocab):
                found.append(cache.cold)  # the tower's input is all "unknown"
            elif query.record_revision is not None and query.user_id is not None:
                found.append(cache.lookup(query.user_id, query.record_revision))
            else:
                found.append(None)
        todo = [i for i, d in enumerate(found) if d is None]
        if todo:
            rows = [queries[i] for i in todo]
            vectors = pair.embed([q.user_id for q in rows], [q.features for q in rows], [q.history for q in rows])
            for row, i in enumerate(todo):
                query = queries[i]
                storable = query.record_revision is not None and query.user_id is not None
                seen = _NO_POSITIONS
                if query.exclude_seen or storable:  # a remembered record may be asked with exclude_seen later
                    seen = np.array(_known(pair.index.positions_of(list({*query.history, *query.seen}))), np.int64)
                found[i] = d = Derived(vectors[row].copy(), seen)
                if storable:
                    assert query.user_id is not None and query.record_revision is not None
                    cache.remember(query.user_id, query.record_revision, d)
        return [d for d in found if d is not None]  # every row has one by now

    def _plan(self, pair: ServingPair, query: UserQuery, derived: Derived, plain: bool) -> _Plan:
        index = pair.index
        excluded = set(derived.seen.tolist()) if query.exclude_seen else set()
        if query.exclude:
            excluded.update(_known(index.positions_of(list(query.exclude))))
        mask = pair.attributes.mask(query.filter) if query.filter else None
        n = len(index)
        allowed_fraction = 1.0 if mask is None else max(float(mask.mean()), 1.0 / n)
        factor = 1.0 if mask is None else self.overfetch / allowed_fraction
        fetch = min(math.ceil((query.k + len(excluded)) * factor), n, max(self.max_fetch, query.k))
        return _Plan(excluded, mask, fetch, derived if plain else None)

    # ---- similar items

    def similar(self, item_id: str, k: int) -> SimilarItems:
        """The k items whose index vectors have the largest inner product with `item_id`'s, itself excluded."""
        pair, _ = self._serving()
        position = int(pair.index.positions_of([item_id])[0])
        if position < 0:
            raise UnknownItemError(f"item {item_id!r} is not in index {pair.index_version}")
        scores, positions = pair.index.similar(position, min(k, max(len(pair.index) - 1, 1)))
        keep = positions >= 0
        return SimilarItems(
            item_id=item_id,
            item_ids=[pair.index.item_ids[p] for p in positions[keep].tolist()],
            scores=[float(s) for s in scores[keep].tolist()],
            model_version=pair.model_version,
            index_version=pair.index_version,
        )


def _pick(
    index: ItemIndex,
    vector: np.ndarray,
    row_scores: np.ndarray,
    row_positions: np.ndarray,
    fetch: int,
    k: int,
    plan: _Plan,
) -> Answer:
    """The first k of one row's candidates that pass its plan; exact search over exactly the items that pass it
    when the candidates run out before k."""
    excluded, mask = plan.excluded, plan.mask
    picked: list[tuple[int, float]] = []
    for p, s in zip(row_positions.tolist(), row_scores.tolist(), strict=True):
        if p < 0:
            break
        if p in excluded or (mask is not None and not mask[p]):
            continue
        picked.append((p, s))
        if len(picked) == k:
            break
    n = len(index)
    # The search saw every item only if it fetched the whole catalog and returned it all.
    complete = fetch >= n and bool((row_positions >= 0).all())
    fallback = len(picked) < k and not complete
    if fallback:
        allowed = np.ones(n, dtype=bool) if mask is None else mask.copy()
        if excluded:
            allowed[np.fromiter(excluded, dtype=np.int64)] = False
        subset = np.flatnonzero(allowed)
        picked = []
        if subset.size:
            exact_scores, exact_pos = index.exact_search_subset(vector[None, :], subset, k)
            picked = [(int(p), float(s)) for p, s in zip(exact_pos[0], exact_scores[0], strict=True) if p >= 0]
    return Answer(
        tuple(index.item_ids[p] for p, _ in picked), np.array([s for _, s in picked], dtype=np.float32), fallback
    )


def _known(positions: np.ndarray) -> list[int]:
    """The positions of ids the index holds (`positions_of` gives -1 for the others), as Python ints."""
    return positions[positions >= 0].tolist()
