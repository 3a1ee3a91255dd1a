"""The service's domain errors and the ONE place that maps them to HTTP.

The retriever, the store and the index manager raise these; they know nothing of HTTP. `app.py` installs
one handler for `ServiceError` that answers with `HTTP_STATUS[type]` and `error_body(exc)`. Request
validation (pydantic) errors keep FastAPI's standard 422 body; `InvalidInputError` (input that is well-formed
but wrong for the loaded model, e.g. an unknown feature name) answers in the same shape, naming the field.

    ServiceError                    base class, never raised itself
     ├── InvalidInputError          422  well-formed input the loaded model cannot take; names the field
     ├── NotFoundError              404
     │    ├── UnknownItemError      404  item id not in the active index
     │    └── AdminDisabledError    404  admin API off: no TWOTOWER_ADMIN_TOKEN configured
     ├── UnauthorizedError          401  admin call without the right bearer token
     ├── LoadRefusedError           409  a model/index pair was refused; the previous pair keeps serving
     └── UnavailableError           503
          ├── NotReadyError         503  no model/index pair loaded yet
          └── StoreUnavailableError 503  Redis unreachable (events cannot be stored)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ServiceError(Exception):
    """Base class of every error the service maps to an HTTP status."""

    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(ServiceError):
    """Input that validates as JSON but cannot be served by the loaded model; `loc` names the field."""

    def __init__(self, message: str, loc: Sequence[str | int], input_value: Any = None) -> None:
        super().__init__(message)
        self.loc: tuple[str | int, ...] = tuple(loc)
        self.input_value = input_value

    def at(self, *prefix: str | int) -> InvalidInputError:
        """The same error located under `prefix` (e.g. ("body", "requests", 3))."""
        return InvalidInputError(self.message, (*prefix, *self.loc), self.input_value)


class NotFoundError(ServiceError):
    """Something the request names does not exist."""


class UnknownItemError(NotFoundError):
    """The item id is not in the active index."""


class AdminDisabledError(NotFoundError):
    """The admin API is disabled because no admin token is configured."""


class UnauthorizedError(ServiceError):
    """An admin call without the configured bearer token."""

    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012 - read-only class constant


class LoadRefusedError(ServiceError):
    """A model/index pair failed its checks and was not swapped in; the previous pair keeps serving."""


class UnavailableError(ServiceError):
    """A dependency needed for this request is not available right now; retrying later may succeed."""

    headers = {"Retry-After": "1"}  # noqa: RUF012 - read-only class constant


class NotReadyError(UnavailableError):
    """No model/index pair is loaded yet."""


class StoreUnavailableError(UnavailableError):
    """Redis is unreachable; nothing was written."""


HTTP_STATUS: dict[type[ServiceError], int] = {
    InvalidInputError: 422,
    NotFoundError: 404,
    UnauthorizedError: 401,
    LoadRefusedError: 409,
    UnavailableError: 503,
}


def status_for(exc: ServiceError) -> int:
    """The HTTP status of an error: the entry of its nearest class in `HTTP_STATUS`."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_body(exc: ServiceError) -> dict[str, Any]:
    """JSON body of an error response. `InvalidInputError` uses pydantic's shape so clients parse one format."""
    if isinstance(exc, InvalidInputError):
        return {
            "detail": [
                {"type": "value_error", "loc": list(exc.loc), "msg": exc.message, "input": exc.input_value},
            ]
        }
    return {"detail": exc.message, "error": type(exc).__name__}
