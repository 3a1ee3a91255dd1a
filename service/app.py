"""`create_app()`: the FastAPI application, its lifespan and the one error handler.

Lifespan: limit the process's compute threads -> start the store (the embedded Redis too, when no URL is
configured) -> load the active model/index pair -> watch for new ones (Redis pub/sub + polling the ACTIVE_INDEX
file) -> on shutdown stop watching and close the store. A missing or refused pair does not stop start-up:
/readyz answers 503 until one loads.

Run it with `twotower serve` / `python -m service serve` (uvicorn, `service.app:create_app` as a factory).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.deps import Services
from service.errors import ServiceError, error_body, status_for, validation_error_body
from service.metrics import Metrics, MetricsMiddleware
from service.recommender import Recommender
from service.retriever import Retriever
from service.routes import admin, router
from service.schemas import Limits
from service.settings import Settings
from service.store import FeatureStore
from service.watcher import IndexWatcher

log = logging.getLogger(__name__)

# Container allocations between young-generation collections (CPython's default: 700). A recommendation keeps a
# batch's requests alive together, so with the default the collector runs every few requests under load;
# reference counting frees nearly everything a request allocates, and this only delays reclaiming cycles.
GC_YOUNG_THRESHOLD = 50_000


def limit_threads(n: int) -> None:
    """Torch, FAISS and BLAS thread pools of this process, each at `n`: concurrency comes from serving many
    requests at once, and intra-op threads per request would oversubscribe the cores (spinning BLAS workers
    stall small batched matmuls). `python -m service` also sets OPENBLAS_NUM_THREADS before numpy loads;
    threadpoolctl covers apps created otherwise."""
    import torch
    from threadpoolctl import threadpool_limits

    from training.index import set_threads

    torch.set_num_threads(n)
    set_threads(n)
    threadpool_limits(n, user_api="blas")


def build_services(settings: Settings) -> Services:
    """The service objects of one app, all cheap to construct; nothing starts until the lifespan runs."""
    metrics = Metrics()
    retriever = Retriever(settings.artifacts, user_tower=settings.user_tower, cache_size=settings.answer_cache_size)
    store = FeatureStore(
        settings.redis_url,
        data_dir=settings.data_dir,
        prefix=settings.redis_prefix,
        max_history=settings.max_history,
        max_seen=settings.max_seen,
        event_log_max=settings.event_log_max,
        timeout=settings.redis_timeout,
        on_error=lambda operation: metrics.store_errors.labels(operation).inc(),
        cache_seconds=settings.user_cache_seconds,
        cache_size=settings.user_cache_size,
    )
    return Services(
        settings=settings,
        limits=Limits(
            max_k=settings.max_k,
            max_history=settings.max_history,
            max_exclude=settings.max_exclude,
            max_batch=settings.max_batch,
            max_events=settings.max_events,
        ),
        retriever=retriever,
        store=store,
        watcher=IndexWatcher(retriever, store, metrics, settings.poll_seconds),
        metrics=metrics,
        recommender=Recommender(
            retriever,
            store,
            metrics,
            max_history=settings.max_history,
            batch_max=settings.batch_max,
            batch_wait=settings.batch_wait_ms / 1000,
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application. `settings` default to the `TWOTOWER_*` environment, read here, once."""
    settings = settings if settings is not None else Settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limit_threads(settings.threads)
        await services.store.start()
        try:
            await services.watcher.start()
            # Everything loaded so far (model, index ids, vocabularies, the framework) lives as long as the
            # process: moved out of the collector's reach, full collections under load stop scanning it.
            gc.collect()
            gc.freeze()
            thresholds = gc.get_threshold()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
            try:
                yield
            finally:
                gc.set_threshold(*thresholds)
                await services.watcher.stop()
                services.recommender.close()
        finally:
            await services.store.close()

    app = FastAPI(
        title="twotower",
        summary="Two-tower recommendations: user tower + FAISS inner-product index, Redis online state.",
        version="1",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.max_body_bytes = settings.max_body_bytes  # read by every StrictJSONRoute
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc.errors()), status_code=422)

    app.include_router(router)
    app.include_router(admin, include_in_schema=settings.admin_enabled)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema with the configured limits written in (max k, list lengths)."""
        if app.openapi_schema is None:
            app.openapi_schema = services.limits.document(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
