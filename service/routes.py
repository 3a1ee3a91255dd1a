"""HTTP routes (API v1, probes, metrics, admin): thin translations between HTTP and the retriever/store/watcher.

Each route parses (pydantic), checks the configured limits, calls into the service objects and shapes the
response. Errors are raised as `service.errors` types and mapped to HTTP in one place (app.py).

`POST /v1/recommendations` (the hot path, see docs/performance.md): requests without an attribute filter go
through the app's `MicroBatcher`: concurrent requests share ONE Redis pipeline, ONE user-tower forward and ONE
index search, run on the event loop (a batch is a few hundred microseconds; a thread-pool hop per request cost
more than that), and the answer is written as JSON bytes directly (`recommendation_json`), not through a
pydantic model. Filtered requests (whose exact fallback can scan many items) and the batch endpoint run the
same retriever in the thread pool so the loop keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from json.encoder import encode_basestring_ascii
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.deps import AdminDep, MetricsDep, Services, ServicesDep, StoreDep, WatcherDep, check_limits
from service.errors import InvalidInputError, StoreUnavailableError
from service.retriever import Recommendation, UserQuery
from service.schemas import (
    MAX_ID_LENGTH,
    BatchRecommendRequest,
    BatchRecommendResponse,
    EventsAccepted,
    EventsRequest,
    PinRequest,
    Readiness,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    SimilarItemsResponse,
    StoreStatus,
    SwapResponse,
)
from service.store import StoredUser

router = APIRouter()
admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


def _query(request: RecommendRequest, stored: StoredUser | None, max_history: int) -> UserQuery:
    """Merge what the store holds with what the request carries: request features override stored ones, the
    request's history (most recent) goes before the stored one, each item once."""
    source: StoredUser | None = None
    if stored is not None and not request.features and not request.history:
        # Most known users: the stored record as it is, which the retriever may recognise (`UserQuery.source`).
        features, history, source = stored.features, stored.history[:max_history], stored
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
        source=source,
    )


async def _queries(services: Services, requests: Sequence[RecommendRequest]) -> tuple[list[UserQuery], bool]:
    """Each request merged with what the store holds for its user, in one store call; degraded when the store
    is unreachable (then requests are served from their own data; /readyz and metrics say so)."""
    user_ids = [r.user_id for r in requests if r.user_id is not None]
    degraded = False
    stored: dict[str, StoredUser] = {}
    if user_ids:
        try:
            stored = await services.store.get_users(user_ids)
        except StoreUnavailableError:
            degraded = True
    max_history = services.settings.max_history
    return [_query(r, stored.get(r.user_id) if r.user_id else None, max_history) for r in requests], degraded


def _count(services: Services, result: Recommendation, degraded: bool) -> None:
    services.metrics.count_recommendation(result.path, degraded)
    if result.exact_fallback:
        services.metrics.exact_fallbacks.inc()


async def _recommend(services: Services, requests: list[RecommendRequest], *, batch: bool) -> list[RecommendResponse]:
    queries, degraded = await _queries(services, requests)
    try:
        results: list[Recommendation] = await run_in_threadpool(services.retriever.recommend, queries)
    except InvalidInputError as e:  # located at (request index, field...) by the retriever
        where = ("body", "requests", *e.loc) if batch else ("body", *e.loc[1:])
        raise InvalidInputError(e.message, where, e.input_value) from e
    for result in results:
        _count(services, result, degraded)
    return [
        RecommendResponse(
            user_id=request.user_id,
            items=[ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores, strict=True)],
            model_version=result.model_version,
            index_version=result.index_version,
            path=result.path,
            degraded=degraded,
            exact_fallback=result.exact_fallback,
        )
        for request, result in zip(requests, results, strict=True)
    ]


_BOOL = {True: "true", False: "false"}


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def recommendation_json(user_id: str | None, result: Recommendation, degraded: bool) -> bytes:
    """The JSON of `RecommendResponse` (same fields, same order, same values), written directly: building and
    serializing the pydantic model cost more than the tower and the search together."""
    items = ",".join(
        f'{{"item_id":{encode_basestring_ascii(i)},"score":{float(s)!r}}}'
        for i, s in zip(result.item_ids, result.scores, strict=True)
    )
    return (
        f'{{"user_id":{_json_text(user_id)},"items":[{items}],'
        f'"model_version":{encode_basestring_ascii(result.model_version)},'
        f'"index_version":{encode_basestring_ascii(result.index_version)},"path":"{result.path}",'
        f'"degraded":{_BOOL[degraded]},"exact_fallback":{_BOOL[result.exact_fallback]}}}'
    ).encode()


async def recommend_batched(services: Services, requests: Sequence[RecommendRequest]) -> list[bytes | BaseException]:
    """The micro-batcher's `process`: one Redis pipeline, one forward + search (on the loop), JSON bytes per
    request. A request the model cannot take gets its own 422 error; its batch-mates are answered."""
    queries, degraded = await _queries(services, requests)
    retriever = services.retriever
    results: list[Recommendation | BaseException]
    try:
        results = list(retriever.recommend(queries))
    except InvalidInputError:
        results = []
        for query in queries:  # locate the bad request(s): each alone, exactly as an unbatched call would run
            try:
                results.append(retriever.recommend([query])[0])
            except InvalidInputError as e:
                results.append(InvalidInputError(e.message, ("body", *e.loc[1:]), e.input_value))
    out: list[bytes | BaseException] = []
    for request, result in zip(requests, results, strict=True):
        if isinstance(result, BaseException):
            out.append(result)
            continue
        _count(services, result, degraded)
        out.append(recommendation_json(request.user_id, result, degraded))
    return out


@router.post("/v1/recommendations", tags=["recommendations"], response_model=RecommendResponse)
async def recommend(body: RecommendRequest, request: Request) -> Response:
    """Top-k items for one user (known user, features only, or cold start)."""
    # What `ServicesDep` returns, read directly: resolving a sub-dependency cost this hot route more than the
    # user tower does (docs/performance.md).
    services: Services = request.app.state.services
    check_limits(services, body)
    if body.filter:
        [response] = await _recommend(services, [body], batch=False)
        return Response(response.model_dump_json(), media_type="application/json")
    return Response(await services.batcher.submit(body), media_type="application/json")


@router.post("/v1/recommendations/batch", tags=["recommendations"])
async def recommend_batch(body: BatchRecommendRequest, services: ServicesDep) -> BatchRecommendResponse:
    """Top-k for many users in one call: one tower forward pass and one index search."""
    check_limits(services, body)
    return BatchRecommendResponse(responses=await _recommend(services, body.requests, batch=True))


@router.post("/v1/events", tags=["events"])
async def record_events(body: EventsRequest, services: ServicesDep, store: StoreDep) -> EventsAccepted:
    """Append interactions to users' histories; the next recommendation reflects them. 503 (nothing written)
    when the store is unreachable: an event is acknowledged only once it is stored."""
    check_limits(services, body)
    events = body.as_events()
    accepted = await store.record_events([(e.user_id, e.item_id) for e in events])
    services.metrics.events.inc(accepted)
    return EventsAccepted(accepted=accepted)


@router.get("/v1/items/{item_id}/similar", tags=["items"])
async def similar_items(
    item_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)],
    services: ServicesDep,
    k: Annotated[int, Query(ge=1, description="items to return (at most TWOTOWER_MAX_K)")] = 10,
) -> SimilarItemsResponse:
    """Items closest to `item_id` by the same inner product the recommendations use; 404 for an unknown item."""
    errors = services.limits.k_errors(k, ("query", "k"))
    if errors:
        raise RequestValidationError(errors)
    result = await run_in_threadpool(services.retriever.similar, item_id, k)
    return SimilarItemsResponse(
        item_id=result.item_id,
        items=[ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores, strict=True)],
        model_version=result.model_version,
        index_version=result.index_version,
    )


@router.get("/healthz", tags=["probes"])
async def healthz(services: ServicesDep) -> dict[str, object]:
    """Liveness: the process and its event loop answer. Readiness is /readyz."""
    return {"status": "alive", "uptime_seconds": round(time.monotonic() - services.started_at, 1)}


@router.get(
    "/readyz",
    tags=["probes"],
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "no model/index pair loaded yet"}},
)
async def readyz(services: ServicesDep, watcher: WatcherDep) -> JSONResponse:
    """Ready once a model/index pair is loaded (503 before); reports versions, item count and the store."""
    store = services.store
    await store.ping()  # a real check; never raises, updates the health the body reports
    health = store.health
    pair = services.retriever.current
    body = Readiness(
        status="ready" if pair is not None else "not_ready",
        degraded=health.status != "ok",
        model_version=pair.model_version if pair else None,
        index_version=pair.index_version if pair else None,
        items=len(pair.index) if pair else None,
        index_recipe=pair.index.recipe if pair else None,
        pinned=watcher.pinned,
        store=StoreStatus(status=health.status, backend=health.backend, error=health.error),
        last_swap_error=watcher.last_error,
    )
    return JSONResponse(body.model_dump(), status_code=200 if pair is not None else 503)


@router.get("/metrics", tags=["probes"], response_class=Response)
async def metrics(metrics: MetricsDep, store: StoreDep) -> Response:
    """Prometheus exposition."""
    metrics.store_up.set(1 if store.health.status == "ok" else 0)
    metrics.observe_cache(store.cache)
    return Response(metrics.render(), media_type=metrics.content_type)


@admin.post("/reload")
async def admin_reload(watcher: WatcherDep) -> SwapResponse:
    """Drop any pin and load the version the ACTIVE_INDEX pointer names (409 if refused; the old pair serves on)."""
    result = await watcher.reload()
    return SwapResponse(**asdict(result))


@admin.post("/pin")
async def admin_pin(body: PinRequest, watcher: WatcherDep) -> SwapResponse:
    """Serve `index_version` and ignore new publications until the next reload (409 if refused)."""
    result = await watcher.pin(body.index_version)
    return SwapResponse(**asdict(result))
