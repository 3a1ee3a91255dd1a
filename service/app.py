"""`create_app()`: the FastAPI application, its lifespan and the one error handler.

Lifespan: start the store (the embedded Redis too, when no URL is configured) -> load the active model/index
pair -> watch for new ones (Redis pub/sub + polling the ACTIVE_INDEX file) -> on shutdown stop watching and
close the store. A missing or refused pair does not stop start-up: /readyz answers 503 until one loads.

Run it with `twotower serve` (uvicorn, `service.app:create_app` as a factory) or `python -m service`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.batcher import MicroBatcher
from service.deps import Services
from service.errors import ServiceError, error_body, status_for
from service.metrics import Metrics, MetricsMiddleware
from service.retriever import Retriever
from service.routes import admin, recommend_batched, router
from service.schemas import Limits, RecommendRequest
from service.settings import Settings
from service.store import FeatureStore
from service.watcher import IndexWatcher
from training.index import set_threads

log = logging.getLogger(__name__)

# Container allocations between young-generation collections (CPython's default: 700). A recommendation
# keeps a batch's requests alive together, and with the default the collector ran every ~12 requests and took
# ~34 µs per request under load (100k items, c32: 21 / 6 / 7 µs in generations 0 / 1 / 2); `bare` paid ~0.
# Reference counting frees nearly everything a request allocates; this only delays reclaiming cycles.
GC_YOUNG_THRESHOLD = 50_000


def _limit_blas_threads(n: int) -> None:
    """numpy's (and FAISS's) OpenBLAS start one thread per core; on a busy machine their spinning workers
    stalled small batched matmuls by milliseconds. `twotower serve` sets OPENBLAS_NUM_THREADS before numpy
    loads; this covers apps created otherwise, when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n, user_api="blas")


def build_services(settings: Settings) -> Services:
    """The service objects of one app, all cheap to construct; nothing starts until the lifespan runs."""
    metrics = Metrics()
    # The retriever remembers what it derived from cached user records: as many as the cache holds, none without it.
    memo_size = settings.user_cache_size if settings.user_cache_seconds > 0 else 0
    retriever = Retriever(settings.artifacts, user_tower=settings.user_tower, memo_size=memo_size)
    store = FeatureStore(
        settings.redis_url,
        data_dir=settings.data_dir,
        prefix=settings.redis_prefix,
        max_history=settings.max_history,
        timeout=settings.redis_timeout,
        on_error=lambda operation: metrics.store_errors.labels(operation).inc(),
        cache_seconds=settings.user_cache_seconds,
        cache_size=settings.user_cache_size,
    )
    services: Services

    async def process(requests: Sequence[RecommendRequest]) -> list[bytes | BaseException]:
        metrics.batch_requests.observe(len(requests))
        return await recommend_batched(services, requests)

    services = Services(
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
        batcher=MicroBatcher(process, max_batch=settings.batch_max, max_wait=settings.batch_wait_ms / 1000),
    )
    return services


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application. `settings` default to the `TWOTOWER_*` environment, read here, once."""
    settings = settings if settings is not None else Settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Concurrency comes from serving many requests at once; intra-op threads per request would oversubscribe.
        torch.set_num_threads(settings.threads)
        set_threads(settings.threads)
        _limit_blas_threads(settings.threads)
        await services.store.start()
        try:
            await services.watcher.start()
            # Everything loaded so far (model, index ids, vocabularies, the framework) lives as long as the
            # process: moved out of the collector's reach, full collections under load stop scanning it
            # (they were the tens-of-ms stalls at p99 in benchmarks/serve.py).
            gc.collect()
            gc.freeze()
            thresholds = gc.get_threshold()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
            try:
                yield
            finally:
                gc.set_threshold(*thresholds)
                await services.watcher.stop()
        finally:
            await services.store.close()

    app = FastAPI(
        title="twotower",
        summary="Two-tower recommendations: user tower + FAISS inner-product index, Redis online state.",
        version="1",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    app.state.services = services
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=status_for(exc), headers=exc.headers)

    app.include_router(router)
    app.include_router(admin, include_in_schema=settings.admin_enabled)
    return app
