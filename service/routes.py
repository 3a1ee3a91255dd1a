"""HTTP routes (API v1, probes, metrics, admin): thin translations between HTTP and the service objects.

Each route parses (pydantic), checks the configured limits, calls ONE service object through its dependency
alias (`service.deps`) and shapes the response. The two routes clients call per request and per event
(recommendations, events) take the `Request` and read the services off it (`services_of`) instead: resolving a
dependency is a measurable share of a request's cost (docs/performance.md). Recommendations are answered by
`service.recommender.Recommender` as JSON bytes, the same path for single and batch calls. Errors are raised as
`service.errors` types and mapped to HTTP in one place (`service.errors.status_for`, installed by `service.app`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.deps import AdminDep, MetricsDep, ServicesDep, StoreDep, WatcherDep, services_of
from service.json_body import StrictJSONRoute
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
    error_responses,
)

JSON = "application/json"

router = APIRouter(route_class=StrictJSONRoute)
admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep], route_class=StrictJSONRoute)


@router.post(
    "/v1/recommendations",
    tags=["recommendations"],
    response_model=RecommendResponse,
    responses=error_responses(400, 413, 503),
)
async def recommend(body: RecommendRequest, request: Request) -> Response:
    """Top-k items for one user (known user, features only, or cold start)."""
    services = services_of(request)
    services.check_limits(body)
    return Response(await services.recommender.recommend(body), media_type=JSON)


@router.post(
    "/v1/recommendations/batch",
    tags=["recommendations"],
    response_model=BatchRecommendResponse,
    responses=error_responses(400, 413, 503),
)
async def recommend_batch(body: BatchRecommendRequest, services: ServicesDep) -> Response:
    """Top-k for many users in one call: one tower forward pass and one index search."""
    services.check_limits(body)
    return Response(await services.recommender.recommend_many(body.requests), media_type=JSON)


@router.post("/v1/events", tags=["events"], responses=error_responses(400, 413, 503))
async def record_events(body: EventsRequest, request: Request) -> EventsAccepted:
    """Append interactions to users' histories; the next recommendation reflects them. 503 (nothing written)
    when the store is unreachable: an event is acknowledged only once it is stored."""
    services = services_of(request)
    services.check_limits(body)
    events = body.as_events()
    accepted = await services.store.record_events([(e.user_id, e.item_id) for e in events])
    services.metrics.events.inc(accepted)
    return EventsAccepted(accepted=accepted)


@router.get("/v1/items/{item_id}/similar", tags=["items"], responses=error_responses(404, 503))
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
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready once a model/index pair is loaded (503 before); reports versions, item count and the store."""
    store, watcher = services.store, services.watcher
    health = store.health  # kept fresh by the store's monitor: a frozen Redis cannot stall the probe
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


@admin.post("/reload", responses=error_responses(401, 404, 409, 503))
async def admin_reload(watcher: WatcherDep) -> SwapResponse:
    """Drop any pin and load the version the ACTIVE_INDEX pointer names (409 if refused; the old pair serves on)."""
    result = await watcher.reload()
    return SwapResponse(**asdict(result))


@admin.post("/pin", responses=error_responses(400, 401, 404, 409, 413, 503))
async def admin_pin(body: PinRequest, watcher: WatcherDep) -> SwapResponse:
    """Serve `index_version` and ignore new publications until the next reload (409 if refused)."""
    result = await watcher.pin(body.index_version)
    return SwapResponse(**asdict(result))
