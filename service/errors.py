"""The service's domain errors and the ONE place that maps them to HTTP.

The retriever, the store and the index manager raise these; they know nothing of HTTP. `app.py` installs
one handler for `ServiceError` that answers with `HTTP_STATUS[type]` and `error_body(exc)`, and one for request
validation (pydantic) errors, FastAPI's standard 422 shape rendered by `validation_error_body`: whatever the body
held is echoed back only as a bounded, valid JSON value, so no input can turn a 422 into a 500.
`InvalidInputError` (input that is well-formed but wrong for the loaded model, e.g. an unknown feature name)
answers in the same shape, naming the field.

    ServiceError                    base class, never raised itself
     ├── InvalidInputError          422  well-formed input the loaded model cannot take; names the field
     ├── NotFoundError              404
     │    ├── UnknownItemError      404  item id not in the active index
     │    ├── UnknownVersionError   404  an admin pin names an index version that is not in the artifacts
     │    └── AdminDisabledError    404  admin API off: no TWOTOWER_ADMIN_TOKEN configured
     ├── UnauthorizedError          401  admin call without the right bearer token
     ├── LoadRefusedError           409  a model/index pair was refused; the previous pair keeps serving
     └── UnavailableError           503
          ├── NotReadyError         503  no model/index pair loaded yet
          └── StoreUnavailableError 503  Redis unreachable (events cannot be stored)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from service.json_body import NotJSON

# An offending input is echoed back at most this long (strings) or this wide (lists, objects).
ECHO_CHARACTERS = 80
ECHO_ITEMS = 5
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


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


class UnknownVersionError(NotFoundError):
    """The index version is not in the artifacts."""


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
                {
                    "type": "value_error",
                    "loc": [_location(p) for p in exc.loc],
                    "msg": _text(exc.message),
                    "input": _echo(exc.input_value),
                },
            ]
        }
    return {"detail": exc.message, "error": type(exc).__name__}


def _text(value: str) -> str:
    if _LONE_SURROGATE.search(value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if len(value) <= ECHO_CHARACTERS else f"{value[:ECHO_CHARACTERS]}… ({len(value)} characters)"


def _echo(value: Any, depth: int = 0) -> Any:
    """`value` as a small, valid JSON value: strings cut short, lone surrogates escaped, non-finite numbers and
    markers as text, long or nested lists and objects summarized."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, NotJSON):
        return str(value)
    if isinstance(value, int):
        return value if abs(value) < 10**18 else _text(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list | tuple):
        if depth or len(value) > ECHO_ITEMS:
            return f"<list of {len(value)} items>"
        return [_echo(v, depth + 1) for v in value]
    if isinstance(value, dict):
        if depth or len(value) > ECHO_ITEMS:
            return f"<object of {len(value)} fields>"
        return {_text(str(k)): _echo(v, depth + 1) for k, v in value.items()}
    return _text(repr(value))


def _location(part: Any) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else _text(str(part))


def validation_error_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's 422 body (`{"detail": [{type, loc, msg, input, ctx}]}`) with every part made safe to render."""
    detail = []
    for error in errors:
        entry: dict[str, Any] = {
            "type": str(error.get("type", "value_error")),
            "loc": [_location(p) for p in error.get("loc", ())],
            "msg": _text(str(error.get("msg", ""))),
        }
        if "input" in error:
            entry["input"] = _echo(error["input"])
        if error.get("ctx"):
            entry["ctx"] = {
                str(k): _echo(v if isinstance(v, int | float | str) else str(v)) for k, v in error["ctx"].items()
            }
        detail.append(entry)
    return {"detail": detail}
