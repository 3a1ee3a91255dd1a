"""The retriever: a loaded (user tower, item index) pair and the two questions it answers, top-k for users and
items similar to an item. A plain class with an explicit lifecycle and no HTTP in it; `service.app` owns HTTP.

Lifecycle: `Retriever(artifacts_root)` is cheap (`ready` is False) -> `load()` reads the active index, then the
model version that index names, checks that they belong together, and swaps the new pair in by replacing ONE
reference -> `recommend()` / `similar()` serve. Each call reads that reference once, so requests in flight finish
on the pair they started with while a new pair is swapped in; a load that fails raises and leaves the old pair
serving.

Request path (`recommend`), for the rows of a batch that nothing remembered answers (below): the SAME
`training.features.encode_users` training used -> one user-tower forward (a numpy copy of the tower's weights
built at load, `service.tower`; tested equal to the module) -> one index search, as deep as the deepest row
needs, each row over-fetched so that k items survive its filters (seen items, explicit excludes, an
item-attribute filter) -> for any row the over-fetch could not fill, exact search over exactly the items that
pass its filters. The scores are the model's: dot(user, item).

Work that does not depend on the request is not redone per request:
- a user the model knows nothing of (no features, no history, no known id) is the pair's `cold` user: one
  vector computed at load, and one top-k per k, computed by the first such request;
- a query that is exactly a stored user's record (`UserQuery.source`: the request added no features or
  history) reuses what an earlier request derived from that same record object under the same pair: its user
  vector, the index positions of its seen items and, when it asks for nothing beyond leaving those out, its
  top-k. The store hands out the same object until the user changes (its cache, service/user_cache.py, is
  invalidated on every write), so the reuse is exact, never stale: a changed user comes back as a new object,
  and a new pair starts with an empty memo. The answer is the same one the search would give: the same
  vector, the same excluded items and the same index return the same candidates.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from service.errors import InvalidInputError, NotReadyError, UnknownItemError
from service.tower import NumpyUserTower
from training.artifacts import INDEX_ITEMS, ArtifactError, ArtifactStore, LoadedModel, VersionMismatchError, load_model
from training.features import EncodedUsers, Vocabulary, encode_items, encode_users
from training.index import ItemIndex, load_index
from training.model import embed_items, embed_users

log = logging.getLogger(__name__)

RecommendationPath = Literal["known_user", "features_only", "cold_start"]

# Versions are directory names under the artifacts root; anything else (a path, "..") is refused before use.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_VERSION_RE = re.compile(VERSION_PATTERN)
# Candidates fetched per wanted item when a filter passes a fraction f of the catalog: k / f * OVERFETCH.
OVERFETCH = 2.0
# The batch's single search never asks for more candidates than this; rows it cannot fill go exact.
MAX_FETCH = 4096
# Known users whose vector, seen positions and answers a pair remembers (oldest dropped first); the service sets
# it to its user cache's size.
MEMO_SIZE = 10_000
# Answers remembered per record: up to this many distinct k, each at most this deep (bounds the memo's memory:
# 10,000 users x 2 x 100 items x 12 bytes = 24 MB at worst; k = 10 costs 120 bytes per user).
MEMO_ANSWERS = 2
MEMO_MAX_K = 100
# Items re-embedded at load to check that the index vectors are this model's item-tower outputs.
PARITY_SAMPLE = 16
PARITY_ATOL = 1e-4


def check_version(version: str, what: str = "version") -> str:
    if not _VERSION_RE.match(version):
        raise ArtifactError(f"{what} {version!r} is not a valid artifact version name (expected {VERSION_PATTERN})")
    return version


# --------------------------------------------------------------------------- item attributes (filters)


class ItemAttributes:
    """Inverted lists over index positions, for attribute filters: attribute -> value -> sorted positions.

    Values are compared as strings; list-valued attributes (genres) match when any of their values match."""

    def __init__(self, n_items: int, postings: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.n_items = n_items
        self.postings = {name: dict(values) for name, values in postings.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self.postings)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, item_ids: Sequence[str], columns: Sequence[str]) -> ItemAttributes:
        """Attributes of the index's items (positions = order of `item_ids`) from a table indexed by item id."""
        table = frame.reindex(pd.Index(item_ids, dtype=object))
        postings: dict[str, dict[str, np.ndarray]] = {}
        for name in columns:
            if name not in table.columns:
                continue
            column = table[name].reset_index(drop=True)
            if pd.api.types.is_float_dtype(column) and ((column.dropna() % 1) == 0).all():
                column = column.astype("Int64")  # a year column with gaps still filters as "1999", not "1999.0"
            values = column.explode().dropna()
            if values.empty:
                postings[name] = {}
                continue
            positions = values.index.to_numpy(dtype=np.int64)
            codes, uniques = pd.factorize(values.astype(str).to_numpy())
            order = np.argsort(codes, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(uniques)))])
            postings[name] = {
                str(value): np.unique(positions[order[bounds[i] : bounds[i + 1]]]) for i, value in enumerate(uniques)
            }
        return cls(len(item_ids), postings)

    def mask(self, conditions: Mapping[str, Collection[str]]) -> np.ndarray:
        """(N,) bool: items that match, for every attribute, at least one of its listed values."""
        out = np.ones(self.n_items, dtype=bool)
        for name, wanted in conditions.items():
            values = self.postings.get(name)
            if values is None:
                raise InvalidInputError(
                    f"unknown item attribute {name!r}; filterable attributes are {self.names}", ("filter", name), name
                )
            hit = np.zeros(self.n_items, dtype=bool)
            for value in wanted:
                positions = values.get(str(value))
                if positions is not None:
                    hit[positions] = True
            out &= hit
        return out


# --------------------------------------------------------------------------- the served pair


@dataclass(frozen=True)
class ServingPair:
    """A verified model + index built from that model's item tower: what one request is served from."""

    model: LoadedModel
    index: ItemIndex
    index_version: str
    index_manifest: Mapping[str, Any]
    attributes: ItemAttributes
    loaded_at: float
    # The user tower as served: a numpy copy of the weights (None: the torch module via `embed_users`).
    user_tower: NumpyUserTower | None = None
    # A user the model knows nothing of (no features, no history, no known id): one vector per pair, computed
    # at load rather than per cold request, and its answers (None until `Retriever.load` sets it).
    cold: _Derived | None = field(default=None, compare=False, repr=False)
    # user id -> what was derived from its stored record under this pair (see the module docstring)
    memo: dict[str, _Derived] = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def user_feature_names(self) -> list[str]:
        return [f.name for f in self.model.model.spec.user_features]

    def embed_users(self, users: EncodedUsers) -> np.ndarray:
        """(B, D) user vectors: the numpy tower when built, else the training module."""
        if self.user_tower is not None:
            return self.user_tower(users)
        return embed_users(self.model.model, users)


_NO_POSITIONS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _Derived:
    source: object  # the stored record these were computed from (compared by identity)
    vector: np.ndarray  # (D,) the user tower's output
    seen: np.ndarray  # index positions of the record's history and seen items
    # k -> the answer when exactly the seen items are left out and nothing else is asked (no excludes, no
    # filter): the same vector searched in the same index gives the same one, so it is searched once. At 1M
    # items a search costs ~300 µs at recall 0.95 (docs/performance.md), most of a request's own work.
    answers: dict[int, _Answer] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class _Answer:
    item_ids: tuple[str, ...]
    scores: np.ndarray  # (k,) float32
    exact_fallback: bool


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
    # The stored record this query's features, history and seen items are, unchanged (None when the request
    # added any): what was derived from it may be reused while the store returns the same object.
    source: object | None = None


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


class Retriever:
    """Serves recommendations from one loaded (model, index) pair, swapped atomically on `load()`."""

    def __init__(
        self,
        artifacts_root: Path,
        *,
        overfetch: float = OVERFETCH,
        max_fetch: int = MAX_FETCH,
        user_tower: Literal["numpy", "torch"] = "numpy",
        memo_size: int = MEMO_SIZE,
    ) -> None:
        if overfetch < 1 or max_fetch < 1 or memo_size < 0:
            raise ValueError(
                f"need overfetch >= 1, max_fetch >= 1 and memo_size >= 0, got {overfetch}, {max_fetch}, {memo_size}"
            )
        self.artifacts = ArtifactStore(Path(artifacts_root))
        self.overfetch = overfetch
        self.max_fetch = max_fetch
        self.user_tower = user_tower
        self.memo_size = memo_size
        self._memo_lock = threading.Lock()  # the batch endpoint runs in threads: evictions must not interleave
        self._pair: ServingPair | None = None
        self._load_lock = threading.Lock()  # one load at a time; serving never takes it

    # ---- lifecycle

    @property
    def ready(self) -> bool:
        return self._pair is not None

    @property
    def pair(self) -> ServingPair:
        """The pair serving now. Read it ONCE per request and use that object throughout."""
        pair = self._pair
        if pair is None:
            raise NotReadyError(
                f"no model/index pair is loaded yet: publish an index under {self.artifacts.root} "
                "(`twotower reindex`) and wait for /readyz"
            )
        return pair

    @property
    def current(self) -> ServingPair | None:
        return self._pair

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
            pair = self._load_pair(check_version(version, "index version"))
            self._pair = pair  # the swap: one reference; requests holding the old pair finish on it
            log.info(
                "serving index %s (%d items, %s) with model %s",
                pair.index_version,
                len(pair.index),
                pair.index.recipe,
                pair.model_version,
            )
            return pair

    def _load_pair(self, index_version: str) -> ServingPair:
        index_dir = self.artifacts.index_dir(index_version)
        if not index_dir.is_dir():
            raise ArtifactError(f"index {index_version} does not exist: no directory {index_dir}")
        index, manifest = load_index(index_dir)
        model_version = check_version(str(manifest.get("model_version")), f"model named by index {index_version}")
        model_dir = self.artifacts.model_dir(model_version)
        if not model_dir.is_dir():
            raise ArtifactError(f"index {index_version} was built from model {model_version}; {model_dir} is missing")
        model = load_model(model_dir)
        if model.version != index.model_version:
            raise VersionMismatchError(
                f"index {index_version} was built from model {index.model_version} but {model_dir} holds model "
                f"{model.version}; refusing to pair them"
            )
        if model.dim != index.dim:
            raise VersionMismatchError(
                f"index {index_version} has dim {index.dim} but model {model.version} embeds in dim {model.dim}"
            )
        items = self._item_table(index_dir, model)
        _check_vectors_match_towers(model, index, items, index_version)
        columns = [f.name for f in model.model.spec.item_features]
        attributes = ItemAttributes.from_frame(items, index.item_ids, columns)
        index.positions_of([])  # builds the id -> position map now rather than on the first request
        model.model.eval()  # once, here: serving never trains
        tower = NumpyUserTower(model.model.user_tower) if self.user_tower == "numpy" else None
        pair = ServingPair(model, index, index_version, manifest, attributes, time.time(), tower)
        cold_vector = self._embed(pair, [UserQuery()])[0]
        return replace(pair, cold=_Derived(None, cold_vector, _NO_POSITIONS))

    @staticmethod
    def _item_table(index_dir: Path, model: LoadedModel) -> pd.DataFrame:
        """The raw catalog the index embedded: the re-index job's copy if present, else the model's catalog."""
        path = index_dir / INDEX_ITEMS
        try:
            table = pd.read_parquet(path) if path.is_file() else model.catalog().reset_index()
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read the item table of {index_dir}: {e}") from e
        if "item_id" in table.columns:
            table = table.set_index("item_id")
        table.index = table.index.astype(str)
        return table

    # ---- serving

    def recommend(self, queries: Sequence[UserQuery]) -> list[Recommendation]:
        """Top-k for each query: one tower forward and one index search for the rows without a remembered answer
        (plus exact search for rows whose filters the over-fetch could not fill). Raises InvalidInputError located at
        `(query_index, field...)` for input the loaded model cannot take."""
        pair = self.pair  # read once: the whole batch runs on this pair
        if not queries:
            return []
        index, vocabs = pair.index, pair.model.model.vocabs
        known_features = set(pair.user_feature_names)
        for i, q in enumerate(queries):
            unknown = sorted(set(q.given_features) - known_features)
            if unknown:
                raise InvalidInputError(
                    f"unknown user feature {unknown[0]!r}; model {pair.model_version} takes {sorted(known_features)}",
                    (i, "features", unknown[0]),
                    unknown[0],
                )

        derived = [self._reused(pair, q) for q in queries]
        todo = [i for i, d in enumerate(derived) if d is None]
        if len(todo) == len(queries):
            vectors = self._embed(pair, queries)  # (B, D)
        else:
            vectors = np.empty((len(queries), index.dim), dtype=np.float32)
            for i, d in enumerate(derived):
                if d is not None:
                    vectors[i] = d.vector
            if todo:
                vectors[todo] = self._embed(pair, [queries[i] for i in todo])
        for i in todo:
            q = queries[i]
            if q.source is not None and q.user_id is not None and self.memo_size:
                seen = np.array(_known(index.positions_of(list({*q.history, *q.seen}))), dtype=np.int64)
                derived[i] = self._remember(pair, q, vectors[i].copy(), seen)

        n = len(index)
        # Per row, either its remembered answer or a plan: excluded positions, filter mask, fetch, and the memo
        # entry that will remember the answer (only when exactly its record's seen items are left out).
        answers: list[_Answer | None] = []
        plans: dict[int, tuple[set[int], np.ndarray | None, int, _Derived | None]] = {}
        for i, q in enumerate(queries):
            d = derived[i]
            memo = d if d is not None and q.exclude_seen and not q.exclude and not q.filter else None
            answers.append(memo.answers.get(q.k) if memo is not None else None)
            if answers[i] is not None:
                continue
            if d is not None:
                excluded = set(d.seen.tolist()) if q.exclude_seen else set()
                if q.exclude:
                    excluded.update(_known(index.positions_of(list(q.exclude))))
            else:
                excluded_ids = set(q.exclude) | ({*q.history, *q.seen} if q.exclude_seen else set())
                excluded = set(_known(index.positions_of(list(excluded_ids))))
            try:
                mask = pair.attributes.mask(q.filter) if q.filter else None
            except InvalidInputError as e:
                raise e.at(i) from e
            allowed_fraction = 1.0 if mask is None else max(float(mask.mean()), 1.0 / n)
            factor = 1.0 if mask is None else self.overfetch / allowed_fraction
            fetch = min(math.ceil((q.k + len(excluded)) * factor), n, max(self.max_fetch, q.k))
            plans[i] = (excluded, mask, fetch, memo if memo is not None and q.k <= MEMO_MAX_K else None)
        if plans:
            # ONE search for the rows without an answer, as deep as the deepest needs. Splitting them by depth
            # was measured slower (1M items, batch 12: 82 µs vs 75 µs per query): each search pays the coarse
            # quantizer again.
            rows = list(plans)
            fetch = max(plan[2] for plan in plans.values())
            scores, positions = index.search(vectors if len(rows) == len(queries) else vectors[rows], fetch)
            for row, i in enumerate(rows):
                excluded, mask, _, memo = plans[i]
                found = self._pick(index, vectors[i], scores[row], positions[row], fetch, queries[i].k, excluded, mask)
                if memo is not None and len(memo.answers) < MEMO_ANSWERS:
                    memo.answers.setdefault(queries[i].k, found)
                answers[i] = found

        out: list[Recommendation] = []
        for q, answer in zip(queries, answers, strict=True):
            assert answer is not None
            out.append(
                Recommendation(
                    item_ids=list(answer.item_ids),
                    scores=answer.scores.tolist(),
                    path=_path(q, vocabs.user_ids),
                    model_version=pair.model_version,
                    index_version=pair.index_version,
                    exact_fallback=answer.exact_fallback,
                )
            )
        return out

    @staticmethod
    def _pick(
        index: ItemIndex,
        vector: np.ndarray,
        row_scores: np.ndarray,
        row_positions: np.ndarray,
        fetch: int,
        k: int,
        excluded: set[int],
        mask: np.ndarray | None,
    ) -> _Answer:
        """The first k of one row's candidates that pass its filters; exact search over exactly the items that
        pass them when the candidates run out before k."""
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
        return _Answer(
            tuple(index.item_ids[p] for p, _ in picked), np.array([s for _, s in picked], dtype=np.float32), fallback
        )

    @staticmethod
    def _embed(pair: ServingPair, queries: Sequence[UserQuery]) -> np.ndarray:
        """(B, D) user vectors: the SAME encoding training used, then the served user tower."""
        model = pair.model.model
        encoded = encode_users(
            model.spec,
            model.vocabs,
            [q.user_id for q in queries],
            {name: [q.features.get(name) for q in queries] for name in pair.user_feature_names},
            [list(q.history) for q in queries],
        )
        return pair.embed_users(encoded)

    @staticmethod
    def _reused(pair: ServingPair, query: UserQuery) -> _Derived | None:
        if not query.features and not query.history and not query.seen and pair.cold is not None:
            model = pair.model.model
            if not model.config.use_user_id or query.user_id is None or query.user_id not in model.vocabs.user_ids:
                return pair.cold  # the tower's input is all "unknown"
        if query.source is None or query.user_id is None:
            return None
        derived = pair.memo.get(query.user_id)
        return derived if derived is not None and derived.source is query.source else None

    def _remember(self, pair: ServingPair, query: UserQuery, vector: np.ndarray, seen: np.ndarray) -> _Derived:
        assert query.user_id is not None
        derived = _Derived(query.source, vector, seen)
        memo = pair.memo
        with self._memo_lock:
            if query.user_id not in memo and len(memo) >= self.memo_size:
                del memo[next(iter(memo))]  # the oldest entry
            memo[query.user_id] = derived
        return derived

    def similar(self, item_id: str, k: int) -> SimilarItems:
        """The k items whose index vectors have the largest inner product with `item_id`'s, itself excluded."""
        pair = self.pair
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


def _known(positions: np.ndarray) -> list[int]:
    """The positions of ids the index holds (`positions_of` gives -1 for the others), as Python ints."""
    return positions[positions >= 0].tolist()


def _path(query: UserQuery, user_vocab: Vocabulary) -> RecommendationPath:
    if query.user_id is not None and (query.stored or query.user_id in user_vocab):
        return "known_user"
    if query.features or query.history:
        return "features_only"
    return "cold_start"


def _check_vectors_match_towers(model: LoadedModel, index: ItemIndex, items: pd.DataFrame, index_version: str) -> None:
    """Re-embed a few catalog items with this model's item tower and compare them with the index's vectors.

    Manifests can be copied, renamed or hand-edited; this catches an index whose vectors come from another item
    tower (the silent "version drift" of DESIGN §6), at the cost of one small forward pass per load."""
    spec = model.model.spec
    names = [f.name for f in spec.item_features]
    if any(name not in items.columns for name in names):
        log.warning("index %s: item table lacks some item features; skipping the tower parity check", index_version)
        return
    step = max(1, len(index) // PARITY_SAMPLE)
    sample = [i for i in range(0, len(index), step) if index.item_ids[i] in items.index][:PARITY_SAMPLE]
    if not sample:
        return
    ids = [index.item_ids[i] for i in sample]
    rows = items.loc[ids]
    encoded = encode_items(spec, model.model.vocabs, ids, {name: rows[name].tolist() for name in names})
    expected = embed_items(model.model, encoded)  # (S, D)
    actual = np.asarray(index.item_vectors[np.asarray(sample)], dtype=np.float32)  # (S, D)
    error = float(np.abs(expected - actual).max())
    if error > PARITY_ATOL:
        raise VersionMismatchError(
            f"index {index_version} says it was built from model {model.version}, but its item vectors differ from "
            f"that model's item tower by up to {error:.3g} (tolerance {PARITY_ATOL}); it was built from another model"
        )
