"""Request bodies read as JSON is defined (RFC 8259): no NaN, no Infinity, no number too large for a float, no
lone UTF-16 surrogate in a string. Python's parser accepts all four; each would later fail the 422 that echoes it
or the answer that carries it, as a 500.

`StrictJSONRoute` is the route class of every router: its requests parse their body with `strict_loads`, which
turns each such value into a `NotJSON` marker. No field of any schema accepts a marker, so pydantic refuses it
with its usual 422 naming the field, wherever in the body it stands (a feature value, an id in a list, a key).
`service.errors.validation_error_body` renders markers (and anything else echoed) safely.

The same request class bounds the body's size (the app's `state.max_body_bytes`). FastAPI's own `max_body_size`
would answer a declared oversize length in plain text, the one error that would not be JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class NotJSON:
    """A value the body held that JSON does not allow: `text` says what it was (for the error message)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NotJSON) and other.text == self.text


def _constant(name: str) -> NotJSON:
    return NotJSON(name)  # NaN, Infinity, -Infinity


def _float(text: str) -> float | NotJSON:
    value = float(text)
    return value if math.isfinite(value) else NotJSON(f"{text} (too large for a number)")


def _mark_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return NotJSON("a string with a lone UTF-16 surrogate") if _LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        return [_mark_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_mark_surrogates(k): _mark_surrogates(v) for k, v in value.items()}
    return value


def strict_loads(body: bytes) -> Any:
    """`json.loads` with the values JSON does not allow turned into `NotJSON` markers."""
    value = json.loads(body, parse_constant=_constant, parse_float=_float)
    # A lone surrogate can only come from a \\u escape or from surrogate bytes (which Python's parser lets pass):
    # the walk is for bodies that hold either.
    if b"\\u" in body or b"\xed" in body:
        value = _mark_surrogates(value)
    return value


class StrictJSONRequest(Request):
    async def body(self) -> bytes:
        """The body, refused with a 413 (JSON, like every error) once it is larger than the app's
        `state.max_body_bytes`: by its declared length before a byte is read, else while it streams in."""
        if not hasattr(self, "_body"):
            limit: int = self.app.state.max_body_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


def _too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"request body larger than {limit} bytes (TWOTOWER_MAX_BODY_BYTES)")


class StrictJSONRoute(APIRoute):
    """An APIRoute whose request body is bounded in size and parsed by `strict_loads`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
