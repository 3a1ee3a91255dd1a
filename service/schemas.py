"""Request and response bodies of the HTTP API (pydantic), and the configurable limits checked on top of them.

Families: `RecommendRequest / RecommendResponse / ScoredItem` (and `recommendation_json`, the response written
without pydantic on the hot path), `BatchRecommendRequest / BatchRecommendResponse`,
`Event / EventsRequest / EventsAccepted`, `SimilarItemsResponse`, `Readiness`, `PinRequest / SwapResponse`.

Static rules (types, id lengths, k >= 1, unknown fields refused) live in the models, so they appear in the
OpenAPI schema. The limits an operator configures (`TWOTOWER_MAX_K`, `..._MAX_HISTORY`, ...) are checked by
`Limits.errors()` right after parsing and answered with the same 422 body pydantic produces, naming the field,
so one model class serves every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StringConstraints, model_validator

from service.retriever import Recommendation, RecommendationPath
from training.artifacts import VERSION_PATTERN

MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 64
MAX_VALUE_LENGTH = 1024
MAX_FEATURES = 64
MAX_VALUES = 256  # values of one multi-valued feature, or of one filter attribute

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
Text = Annotated[str, StringConstraints(max_length=MAX_VALUE_LENGTH)]
# Numbers are strict: a string, a boolean or a float never passes for an int, and an int is bounded (so no digit
# string or literal of any length slips past the length limit of text); JSON's own rules hold (no NaN or Infinity:
# service.json_body).
FeatureInt = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
FeatureValue = Text | FeatureInt | StrictFloat | Annotated[list[Text], Field(max_length=MAX_VALUES)] | None
Timestamp = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False, description="unix seconds")]
VersionName = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]


class _Strict(BaseModel):
    # Unknown fields are refused (422 naming them): a typo such as "exlude" must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    """Who to recommend for (any of user_id / features / history; none at all is a cold start) and how."""

    user_id: UserId | None = Field(None, description="known users get their stored features and history")
    features: dict[Name, FeatureValue] = Field(
        default_factory=dict,
        max_length=MAX_FEATURES,
        description="raw user features; override stored ones. Unknown values are fine (cold start)",
    )
    history: list[ItemId] = Field(
        default_factory=list,
        description="recent item ids, newest first, put before the stored history (at most TWOTOWER_MAX_HISTORY)",
    )
    k: int = Field(10, ge=1, strict=True, description="items to return (at most TWOTOWER_MAX_K)")
    exclude_seen: bool = Field(True, strict=True, description="leave out items in the user's (stored + given) history")
    exclude: list[ItemId] = Field(default_factory=list, description="item ids never to return")
    filter: dict[Name, Annotated[list[Text], Field(min_length=1, max_length=MAX_VALUES)]] | None = Field(
        None,
        max_length=16,
        description='item attribute -> accepted values, e.g. {"genres": ["Comedy"]}: an item must match at least '
        "one value of every attribute given",
        examples=[{"genres": ["g1", "g2"]}],
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="dot(user vector, item vector): the model's score")


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    model_version: str
    index_version: str
    path: RecommendationPath = Field(description="known_user, features_only or cold_start")
    degraded: bool = Field(description="true when the store was unreachable and only request data was used")
    exact_fallback: bool = Field(description="true when filters needed an exact search to fill k")


_BOOL = {True: "true", False: "false"}


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def recommendation_json(user_id: str | None, result: Recommendation, degraded: bool) -> bytes:
    """The JSON of `RecommendResponse` (same fields, same order, same values), written directly: building and
    serializing the pydantic model per answer costs more than the tower and the search (docs/performance.md);
    `tests/test_schemas.py` checks the two are equal."""
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


def batch_recommendation_json(answers: list[bytes]) -> bytes:
    """The JSON of `BatchRecommendResponse` from each request's `recommendation_json`."""
    return b'{"responses":[' + b",".join(answers) + b"]}"


class BatchRecommendRequest(_Strict):
    requests: list[RecommendRequest] = Field(min_length=1, description="at most TWOTOWER_MAX_BATCH")


class BatchRecommendResponse(BaseModel):
    responses: list[RecommendResponse] = Field(description="one per request, in the same order")


class Event(_Strict):
    user_id: UserId
    item_id: ItemId
    timestamp: Timestamp | None = Field(None, description="unix seconds; orders events within one call (none = now)")


# The one-form rule, in the schema too: user_id + item_id (+ timestamp), or events, never both.
_ONE_FORM: dict[str, Any] = {
    "oneOf": [
        {"required": ["user_id", "item_id"], "not": {"required": ["events"]}},
        {
            "required": ["events"],
            "not": {"anyOf": [{"required": ["user_id"]}, {"required": ["item_id"]}, {"required": ["timestamp"]}]},
        },
    ]
}


class EventsRequest(_Strict):
    """One event (`user_id`, `item_id`, `timestamp`) or many (`events`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_FORM)

    user_id: UserId | None = None
    item_id: ItemId | None = None
    timestamp: Timestamp | None = None
    events: list[Event] | None = Field(None, min_length=1, description="at most TWOTOWER_MAX_EVENTS")

    @model_validator(mode="after")
    def _one_form(self) -> EventsRequest:
        single = self.user_id is not None or self.item_id is not None or self.timestamp is not None
        if self.events is not None and single:
            raise ValueError("give either user_id + item_id (+ timestamp) or events, not both")
        if self.events is None and (self.user_id is None or self.item_id is None):
            missing = "user_id" if self.user_id is None else "item_id"
            raise ValueError(f"{missing} is required (or give a list of events)")
        return self

    def as_events(self) -> list[Event]:
        """The events, oldest first (those without a timestamp count as now, in the order given)."""
        if self.events is None:
            assert self.user_id is not None and self.item_id is not None
            return [Event(user_id=self.user_id, item_id=self.item_id, timestamp=self.timestamp)]
        return sorted(self.events, key=lambda e: float("inf") if e.timestamp is None else e.timestamp)


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events written to the store (all of them, or the call fails)")


class ErrorResponse(BaseModel):
    """The body of every error answer but 422 (which is FastAPI's validation shape)."""

    detail: str = Field(description="what went wrong, in a sentence")
    error: str | None = Field(None, description="the error's class (absent for the framework's own 400 and 413)")


ERROR_DESCRIPTIONS = {
    400: "the body could not be read as JSON text",
    401: "the admin bearer token is missing or wrong",
    404: "not found (an unknown item; the admin API when no token is configured)",
    409: "the model/index pair was refused; the previous pair keeps serving",
    413: "the body is larger than TWOTOWER_MAX_BODY_BYTES",
    503: "not ready (no model/index pair loaded) or the store is unreachable; retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: its error statuses, each with `ErrorResponse` and a description."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


class SimilarItemsResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str
    index_version: str


class StoreStatus(BaseModel):
    status: Literal["ok", "degraded"]
    backend: Literal["embedded", "external"]
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    degraded: bool = Field(description="serving, but without the store (request data only)")
    model_version: str | None = None
    index_version: str | None = None
    items: int | None = None
    index_recipe: str | None = None
    pinned: str | None = None
    store: StoreStatus
    last_swap_error: str | None = None


class PinRequest(_Strict):
    index_version: VersionName


class SwapResponse(BaseModel):
    model_version: str
    index_version: str
    changed: bool
    pinned: str | None


@dataclass(frozen=True)
class Limits:
    """The configurable bounds, checked after parsing; `errors()` returns pydantic-shaped 422 entries."""

    max_k: int
    max_history: int
    max_exclude: int
    max_batch: int
    max_events: int

    def document(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The configured limits written into an OpenAPI schema, where the models leave them open."""
        components = schema.get("components", {}).get("schemas", {})

        def at(model: str, field: str) -> dict[str, Any]:
            prop: dict[str, Any] = components[model]["properties"][field]
            return next((s for s in prop.get("anyOf", []) if s.get("type") == "array"), prop)

        if "RecommendRequest" in components:
            components["RecommendRequest"]["properties"]["k"]["maximum"] = self.max_k
            at("RecommendRequest", "history")["maxItems"] = self.max_history
            at("RecommendRequest", "exclude")["maxItems"] = self.max_exclude
        if "BatchRecommendRequest" in components:
            at("BatchRecommendRequest", "requests")["maxItems"] = self.max_batch
        if "EventsRequest" in components:
            at("EventsRequest", "events")["maxItems"] = self.max_events
        for operation in schema.get("paths", {}).get("/v1/items/{item_id}/similar", {}).values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "k":
                    parameter["schema"]["maximum"] = self.max_k
        return schema

    def k_errors(self, k: int, loc: tuple[str | int, ...]) -> list[dict[str, Any]]:
        return _at_most(loc, k, self.max_k)

    def errors(self, body: BaseModel, loc: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(body, RecommendRequest):
            out += self.k_errors(body.k, (*loc, "k"))
            out += _too_long((*loc, "history"), body.history, self.max_history)
            out += _too_long((*loc, "exclude"), body.exclude, self.max_exclude)
        elif isinstance(body, BatchRecommendRequest):
            out += _too_long((*loc, "requests"), body.requests, self.max_batch)
            for i, request in enumerate(body.requests):
                out += self.errors(request, (*loc, "requests", i))
        elif isinstance(body, EventsRequest) and body.events is not None:
            out += _too_long((*loc, "events"), body.events, self.max_events)
        return out


def _at_most(loc: tuple[str | int, ...], value: int, limit: int) -> list[dict[str, Any]]:
    if value <= limit:
        return []
    return [
        {
            "type": "less_than_equal",
            "loc": loc,
            "msg": f"Input should be less than or equal to {limit}",
            "input": value,
            "ctx": {"le": limit},
        }
    ]


def _too_long(loc: tuple[str | int, ...], value: list[Any], limit: int) -> list[dict[str, Any]]:
    if len(value) <= limit:
        return []
    return [
        {
            "type": "too_long",
            "loc": loc,
            "msg": f"List should have at most {limit} items after validation, not {len(value)}",
            "input": f"<list of {len(value)} items>",
            "ctx": {"field_type": "List", "max_length": limit, "actual_length": len(value)},
        }
    ]
