"""FastAPI dependencies as short `Annotated` aliases, so routes read `retriever: RetrieverDep`.

Everything comes from the app's `Services` (built once in `create_app()`); nothing reads the environment per
request. The getters are `async def` on purpose: FastAPI runs a plain `def` dependency in the thread pool, and
that hop (four of them per recommendation) cost more than the tower and the search together. `require_admin`
is the one admin check, attached to the admin router rather than pasted into routes.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from service.batcher import MicroBatcher
from service.errors import AdminDisabledError, UnauthorizedError
from service.metrics import Metrics
from service.retriever import Retriever
from service.schemas import Limits
from service.settings import Settings
from service.store import FeatureStore
from service.watcher import IndexWatcher


@dataclass(frozen=True)
class Services:
    """What one app serves with; stored on `app.state.services`."""

    settings: Settings
    limits: Limits
    retriever: Retriever
    store: FeatureStore
    watcher: IndexWatcher
    metrics: Metrics
    batcher: MicroBatcher[Any, bytes]  # RecommendRequest -> JSON answer (see routes.recommend_batched)
    started_at: float = field(default_factory=time.monotonic)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_retriever(services: ServicesDep) -> Retriever:
    return services.retriever


async def get_store(services: ServicesDep) -> FeatureStore:
    return services.store


async def get_watcher(services: ServicesDep) -> IndexWatcher:
    return services.watcher


async def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RetrieverDep = Annotated[Retriever, Depends(get_retriever)]
StoreDep = Annotated[FeatureStore, Depends(get_store)]
WatcherDep = Annotated[IndexWatcher, Depends(get_watcher)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def check_limits(services: Services, body: BaseModel) -> None:
    """Raise FastAPI's 422 (naming the field) when `body` exceeds a configured limit."""
    errors = services.limits.errors(body)
    if errors:
        raise RequestValidationError(errors, body=None)


async def require_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="Bearer <TWOTOWER_ADMIN_TOKEN>")] = None,
) -> None:
    if settings.admin_token is None:
        raise AdminDisabledError("the admin API is disabled: set TWOTOWER_ADMIN_TOKEN to enable it")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError("admin calls need an `Authorization: Bearer <token>` header")
    if not secrets.compare_digest(token.strip().encode(), settings.admin_token.get_secret_value().encode()):
        raise UnauthorizedError("the admin bearer token is wrong")


AdminDep = Depends(require_admin)
