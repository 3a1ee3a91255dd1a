"""FastAPI dependencies as short `Annotated` aliases, so routes read `services: ServicesDep`, `watcher: WatcherDep`.

Everything comes from the app's `Services` (built once in `create_app()`); nothing reads the environment per
request. Each getter reads `request.app.state.services` directly, with no sub-dependency, and is `async def`: a
plain `def` dependency would run in the thread pool, and a sub-dependency is another resolution per request,
both more than the hot route's own work (docs/performance.md). The recommendation and event routes skip even the
one resolution and call `services_of(request)`. `require_admin` is the one admin check, attached to the admin
router rather than pasted into routes.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from service.errors import AdminDisabledError, UnauthorizedError
from service.metrics import Metrics
from service.recommender import Recommender
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
    recommender: Recommender
    started_at: float = field(default_factory=time.monotonic)

    def check_limits(self, body: BaseModel) -> None:
        """Raise FastAPI's 422 (naming the field) when `body` exceeds a configured limit."""
        errors = self.limits.errors(body)
        if errors:
            raise RequestValidationError(errors, body=None)


def services_of(request: Request) -> Services:
    """The app's services, for the routes that skip dependency resolution (`service.routes`)."""
    services: Services = request.app.state.services
    return services


async def get_services(request: Request) -> Services:
    return services_of(request)


async def get_settings(request: Request) -> Settings:
    return services_of(request).settings


async def get_store(request: Request) -> FeatureStore:
    return services_of(request).store


async def get_watcher(request: Request) -> IndexWatcher:
    return services_of(request).watcher


async def get_metrics(request: Request) -> Metrics:
    return services_of(request).metrics


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[FeatureStore, Depends(get_store)]
WatcherDep = Annotated[IndexWatcher, Depends(get_watcher)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


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
