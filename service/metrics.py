"""Prometheus metrics of one app, on its own registry (two apps in one process, as in tests, never collide),
and the ASGI middleware that times every HTTP request.

Exposed at GET /metrics:

    twotower_http_request_duration_seconds{method,route,status}   histogram (its _count: requests per route+status)
    twotower_recommendations_total{path,degraded}                 users answered, by path (known_user, ...)
    twotower_batch_requests                                       histogram: requests served by each micro-batch
    twotower_exact_fallbacks_total                                rows the over-fetch could not fill (exact search)
    twotower_events_total                                         events written to the store
    twotower_store_errors_total{operation}                        failed Redis calls
    twotower_store_up                                             1 when Redis answered the last call, else 0
    twotower_user_cache_lookups_total{result}                     user reads served from the cache: hit / miss
    twotower_user_cache_live                                      1 while the user cache serves (subscription up)
    twotower_user_cache_users                                     users in the cache
    twotower_swaps_total{result}                                  model/index loads: ok / failed
    twotower_active_info{model_version,index_version}             the pair serving now
    twotower_index_items                                          items in the serving index
"""

from __future__ import annotations

import time
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.retriever import RecommendationPath
from service.user_cache import UserCache

# Requests per micro-batch: up to TWOTOWER_BATCH_MAX (default 32, at most 1024).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# From a fast single request to a slow exact fallback under load: 1 ms .. 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric the service exports, registered on a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.request_seconds = Histogram(
            "twotower_http_request_duration_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "twotower_recommendations",
            "Users answered, by the path that served them",
            ["path", "degraded"],
            registry=r,
        )
        # Children resolved once: `labels()` takes a lock and builds its key on every call, and this counter is
        # bumped once per answered user on the hot path.
        self._recommended = {
            (path, degraded): self.recommendations.labels(path, str(degraded).lower())
            for path in get_args(RecommendationPath)
            for degraded in (False, True)
        }
        self.batch_requests = Histogram(
            "twotower_batch_requests",
            "Recommendation requests served together by one micro-batch (one store read, forward and search)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.exact_fallbacks = Counter(
            "twotower_exact_fallbacks", "Rows filled by exact search after over-fetching fell short", registry=r
        )
        self.events = Counter("twotower_events", "Events written to the store", registry=r)
        self.store_errors = Counter(
            "twotower_store_errors", "Failed Redis calls by operation", ["operation"], registry=r
        )
        self.store_up = Gauge("twotower_store_up", "1 when Redis answered the last call, else 0", registry=r)
        self.swaps = Counter("twotower_swaps", "Model/index pair loads by result", ["result"], registry=r)
        self.active = Info("twotower_active", "The model/index pair serving now", registry=r)
        self.index_items = Gauge("twotower_index_items", "Items in the serving index", registry=r)
        for result in ("ok", "failed"):
            self.swaps.labels(result)  # export zeros, so rate() and alerts work before the first event
        self.store_errors.labels("get_users")
        self.store_errors.labels("record_events")
        self.cache_lookups = Counter(
            "twotower_user_cache_lookups", "User reads by where they were served from", ["result"], registry=r
        )
        self.cache_live = Gauge("twotower_user_cache_live", "1 while the user cache serves", registry=r)
        self.cache_users = Gauge("twotower_user_cache_users", "Users in the cache", registry=r)
        self._cache_counted = {"hit": 0, "miss": 0}

    def count_recommendation(self, path: RecommendationPath, degraded: bool) -> None:
        self._recommended[path, degraded].inc()

    def set_active(self, model_version: str, index_version: str, items: int) -> None:
        self.active.info({"model_version": model_version, "index_version": index_version})
        self.index_items.set(items)

    def observe_cache(self, cache: UserCache[Any]) -> None:
        """Copy the cache's own counts (kept without locks or calls on the request path) at scrape time."""
        for result, total in (("hit", cache.hits), ("miss", cache.misses)):
            self.cache_lookups.labels(result).inc(max(0, total - self._cache_counted[result]))
            self._cache_counted[result] = total
        self.cache_live.set(1 if cache.live else 0)
        self.cache_users.set(len(cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Times each HTTP request and labels it by route TEMPLATE (not raw path: ids would explode cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
