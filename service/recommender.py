"""`Recommender`: the one path every recommendation request takes, from the parsed request to its JSON answer.

    route -> Recommender.recommend -> MicroBatcher -> Recommender._respond:
        FeatureStore.get_users (one Redis read for the batch, through the user cache)
        -> the request merged with the stored record (`UserQuery`)
        -> Retriever.recommend (one tower forward, one index search)
        -> metrics, JSON bytes (`schemas.recommendation_json`)

Concurrent single requests are gathered by the micro-batcher and answered together on the event loop (a batch
costs less than a thread-pool hop per request would). Work that can grow with the catalog or with a user's stored
state runs in a worker thread so the loop keeps serving: a request with an attribute filter (its exact fallback
may scan every matching item) goes alone, the batch endpoint's requests go together, and a micro-batch whose
users leave out many seen items (each one an index lookup and a wider search) is moved there once its store read
shows it. Of any other micro-batch only the index search may leave the loop: when the index build measured it
to cost several thread hops (`OFFLOAD_SEARCH_US`), it runs in a search thread (FAISS releases the GIL) while the
loop serves on. Either way it is the same `_respond`.

If Redis is unreachable, requests are answered from their own data and marked `degraded` (/readyz and the
metrics say so too); a request the model cannot take gets its own 422 and never fails its batch-mates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from starlette.concurrency import run_in_threadpool

from service.batcher import MicroBatcher
from service.errors import InvalidInputError, StoreUnavailableError
from service.metrics import Metrics
from service.retriever import Recommendation, Retriever, UserQuery
from service.schemas import RecommendRequest, batch_recommendation_json, recommendation_json
from service.store import FeatureStore, StoredUser

# A micro-batch whose queries leave out more seen items than this, together, is answered in a worker thread.
OFFLOAD_SEEN_ITEMS = 256
# Otherwise only its index search may go to a search thread: when the index build measured one query at a median
# of this many microseconds per searched row or more, summed over the rows. A hop to the search thread and back
# costs about 20 µs of CPU (two thread switches), so a search worth several hops moves there; a small index's
# search stays on the loop.
OFFLOAD_SEARCH_US = 100.0


def merged_query(request: RecommendRequest, stored: StoredUser | None, max_history: int) -> UserQuery:
    """What the store holds merged with what the request carries: request features override stored ones, the
    request's history (most recent) goes before the stored one, each item once. A request that adds nothing is
    its stored record unchanged (`record_revision`), which the retriever may have derived things from before."""
    revision: str | None = None
    if stored is not None and not request.features and not request.history:
        features, history, revision = stored.features, stored.history[:max_history], stored.revision
    else:
        features = {**(stored.features if stored else {}), **request.features}
        history = list(dict.fromkeys([*request.history, *(stored.history if stored else [])]))[:max_history]
    return UserQuery(
        user_id=request.user_id,
        features=features,
        history=history,
        seen=stored.seen if stored else (),
        k=request.k,
        exclude=frozenset(request.exclude),
        exclude_seen=request.exclude_seen,
        filter={name: frozenset(values) for name, values in request.filter.items()} if request.filter else None,
        stored=stored is not None,
        given_features=frozenset(request.features),
        record_revision=revision,
    )


class Recommender:
    """Answers `RecommendRequest`s with JSON bytes; see the module docstring. Cheap to build; uses the store,
    the retriever and the metrics of one app."""

    def __init__(
        self,
        retriever: Retriever,
        store: FeatureStore,
        metrics: Metrics,
        *,
        max_history: int,
        batch_max: int = 32,
        batch_wait: float = 0.0,
    ) -> None:
        self.retriever = retriever
        self.store = store
        self.metrics = metrics
        self.max_history = max_history
        self.batcher: MicroBatcher[RecommendRequest, bytes] = MicroBatcher(
            self._respond_batched, max_batch=batch_max, max_wait=batch_wait
        )
        # The micro-batches' searches run in this thread (one batch is in progress at a time); asyncio's executor
        # hop costs about half of `run_in_threadpool`'s.
        self._searches = ThreadPoolExecutor(1, thread_name_prefix="twotower-search")

    def close(self) -> None:
        """Stop the search thread (after the last request)."""
        self._searches.shutdown(wait=False, cancel_futures=True)

    async def recommend(self, request: RecommendRequest) -> bytes:
        """The JSON of one `RecommendResponse`; raises InvalidInputError (located under "body") for input the
        model cannot take."""
        if request.filter:
            [answer] = await self._respond([request], offload=True)
            if isinstance(answer, InvalidInputError):
                raise answer
            return answer
        return await self.batcher.submit(request)

    async def recommend_many(self, requests: Sequence[RecommendRequest]) -> bytes:
        """The JSON of one `BatchRecommendResponse`; the first request the model cannot take fails the call with an
        InvalidInputError located at ("body", "requests", i, ...)."""
        answers = await self._respond(requests, offload=True)
        out: list[bytes] = []
        for i, answer in enumerate(answers):
            if isinstance(answer, InvalidInputError):
                raise InvalidInputError(answer.message, ("body", "requests", i, *answer.loc[1:]), answer.input_value)
            out.append(answer)
        return batch_recommendation_json(out)

    async def _respond_batched(self, requests: Sequence[RecommendRequest]) -> list[bytes | BaseException]:
        self.metrics.batch_requests.observe(len(requests))
        return list(await self._respond(requests, offload=False))

    async def _respond(self, requests: Sequence[RecommendRequest], *, offload: bool) -> list[bytes | InvalidInputError]:
        """One store read, one retriever call (in a worker thread when `offload`), one JSON answer or located
        422 error per request."""
        queries, degraded = await self._queries(requests)
        if offload or sum(len(q.seen) for q in queries if q.exclude_seen) > OFFLOAD_SEEN_ITEMS:
            results = await run_in_threadpool(self._recommend, queries)
        else:
            results = await self._recommend_on_loop(queries)
        out: list[bytes | InvalidInputError] = []
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, InvalidInputError):
                out.append(result)
                continue
            self.metrics.count_recommendation(result.path, degraded)
            if result.exact_fallback:
                self.metrics.exact_fallbacks.inc()
            out.append(recommendation_json(request.user_id, result, degraded))
        return out

    async def _queries(self, requests: Sequence[RecommendRequest]) -> tuple[list[UserQuery], bool]:
        """Each request merged with its user's stored record, all read in one store call; degraded (and served
        from the requests' own data) when the store is unreachable."""
        user_ids = [r.user_id for r in requests if r.user_id is not None]
        stored: dict[str, StoredUser] = {}
        degraded = False
        if user_ids:
            try:
                stored = await self.store.get_users(user_ids)
            except StoreUnavailableError:
                degraded = True
        max_history = self.max_history
        queries = [merged_query(r, stored.get(r.user_id) if r.user_id else None, max_history) for r in requests]
        return queries, degraded

    async def _recommend_on_loop(self, queries: Sequence[UserQuery]) -> list[Recommendation | InvalidInputError]:
        """`_recommend` on the event loop, but for a search worth a thread hop (`OFFLOAD_SEARCH_US`), which runs
        in a search thread while the loop serves other requests (on another core, where there is one)."""
        try:
            batch = self.retriever.prepare(queries)
        except InvalidInputError:
            return self._recommend(queries)  # each query alone, so each bad one gets its own error
        p50 = batch.pair.search_p50_us  # None (not measured): searched here, as a small index would be
        if batch.rows_to_search and p50 is not None and batch.rows_to_search * p50 >= OFFLOAD_SEARCH_US:
            await asyncio.get_running_loop().run_in_executor(self._searches, batch.search)
        return list(batch.recommendations())

    def _recommend(self, queries: Sequence[UserQuery]) -> list[Recommendation | InvalidInputError]:
        """The retriever's answers; when some query is invalid, each is run alone to give every bad one its own
        error (located under "body", as an unbatched call would be) and answer the others."""
        try:
            return list(self.retriever.recommend(queries))
        except InvalidInputError:
            pass
        out: list[Recommendation | InvalidInputError] = []
        for query in queries:
            try:
                out.append(self.retriever.recommend([query])[0])
            except InvalidInputError as e:
                out.append(InvalidInputError(e.message, ("body", *e.loc[1:]), e.input_value))
        return out
