"""Input a hostile client sends: values JSON does not allow (NaN, Infinity, numbers too large for a float, lone
UTF-16 surrogates), types that only pass by coercion, inputs echoed back at length. Each is a 422 naming the
field and a response that is itself valid JSON; and the OpenAPI schema states the statuses and limits the code
enforces."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.helpers import make_settings, serving_root
from training.artifacts import LoadedModel

LIMITS = {"max_k": 50, "max_history": 20, "max_exclude": 5, "max_batch": 3, "max_events": 5, "max_body_bytes": 65536}
NOT_JSON = ["NaN", "Infinity", "-Infinity", "1e400", '"\\ud800"', '"a\\udfffb"']


@pytest.fixture(scope="module")
def client(
    trained_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("hostile")
    serving_root(trained_model, root)
    with TestClient(create_app(make_settings(root, redis_url, "hostile:", **LIMITS))) as client:
        yield client


def _strict_json(response: Any) -> Any:
    """The response body parsed as RFC 8259 JSON (Python's parser would also take NaN and Infinity)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"response holds {constant}, which is not JSON")

    text = response.content.decode("utf-8")  # a lone surrogate cannot be encoded: it would have failed here
    return json.loads(text, parse_constant=refuse)


def _post(client: TestClient, path: str, body: str) -> Any:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


# (path, body with {} where the value goes, the loc the 422 must name)
PLACES = [
    ("/v1/recommendations", '{"k": {}}', ["body", "k"]),
    ("/v1/recommendations", '{"user_id": {}}', ["body", "user_id"]),
    ("/v1/recommendations", '{"history": ["i1", {}]}', ["body", "history", 1]),
    ("/v1/recommendations", '{"features": {"segment": {}}}', ["body", "features", "segment"]),
    ("/v1/recommendations", '{"features": {"genres": ["g1", {}]}}', ["body", "features", "genres"]),
    ("/v1/recommendations", '{"exclude": [{}]}', ["body", "exclude", 0]),
    ("/v1/recommendations/batch", '{"requests": [{"k": 2}, {"features": {"segment": {}}}]}', ["body", "requests", 1]),
    ("/v1/events", '{"user_id": "u1", "item_id": "i1", "timestamp": {}}', ["body", "timestamp"]),
    ("/v1/events", '{"events": [{"user_id": {}, "item_id": "i1"}]}', ["body", "events", 0, "user_id"]),
]


@pytest.mark.parametrize("value", NOT_JSON)
@pytest.mark.parametrize(("path", "template", "loc"), PLACES)
def test_values_json_does_not_allow_are_422_naming_the_field(
    client: TestClient, path: str, template: str, loc: list[Any], value: str
) -> None:
    response = _post(client, path, template.replace("{}", value))
    assert response.status_code == 422, response.text
    locs = [error["loc"] for error in _strict_json(response)["detail"]]
    assert any(found[: len(loc)] == loc for found in locs), locs


def test_a_lone_surrogate_in_a_feature_name_is_422(client: TestClient) -> None:
    response = _post(client, "/v1/recommendations", '{"features": {"\\ud83d": "x"}}')
    assert response.status_code == 422, response.text
    assert _strict_json(response)["detail"][0]["loc"][:2] == ["body", "features"]


def test_a_valid_surrogate_pair_is_an_ordinary_string(client: TestClient) -> None:
    response = _post(client, "/v1/recommendations", '{"user_id": "\\ud83d\\ude00", "k": 2}')
    assert response.status_code == 200, response.text
    assert len(_strict_json(response)["items"]) == 2


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"k": True}, ["body", "k"]),
        ({"k": "10"}, ["body", "k"]),
        ({"k": 10.0}, ["body", "k"]),
        ({"exclude_seen": 0}, ["body", "exclude_seen"]),
        ({"exclude_seen": "false"}, ["body", "exclude_seen"]),
        ({"user_id": "u1", "item_id": "i1", "timestamp": True}, ["body", "timestamp"]),
        ({"user_id": "u1", "item_id": "i1", "timestamp": "1700000000"}, ["body", "timestamp"]),
        ({"user_id": "u1", "item_id": "i1", "timestamp": -1}, ["body", "timestamp"]),
    ],
)
def test_values_that_pass_only_by_coercion_are_422(client: TestClient, body: dict[str, Any], loc: list[Any]) -> None:
    path = "/v1/events" if "item_id" in body else "/v1/recommendations"
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize("value", ["1" * 2000, 10**400])
def test_a_feature_value_cannot_outgrow_the_length_limit_as_a_number(client: TestClient, value: Any) -> None:
    response = _post(client, "/v1/recommendations", json.dumps({"features": {"segment": value}}))
    assert response.status_code == 422, response.text
    assert all(error["loc"][:3] == ["body", "features", "segment"] for error in response.json()["detail"])


def test_an_oversized_input_is_echoed_back_short(client: TestClient) -> None:
    huge = "x" * 30_000
    response = client.post("/v1/recommendations", json={"features": {"segment": huge}, "history": [huge]})
    assert response.status_code == 422
    assert len(response.content) < 4000, len(response.content)
    assert all(len(json.dumps(error.get("input"))) < 200 for error in _strict_json(response)["detail"])


def test_a_deeply_nested_body_is_422_not_500(client: TestClient) -> None:
    response = _post(client, "/v1/recommendations", '{"features": {"segment": ' + "[" * 5000 + "]" * 5000 + "}}")
    assert response.status_code in (400, 422), response.text
    _strict_json(response)
    assert client.post("/v1/recommendations", json={"k": 1}).status_code == 200


def test_openapi_documents_every_status_and_the_configured_limits(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"200", "400", "413", "422", "503"} <= set(paths["/v1/recommendations"]["post"]["responses"])
    assert {"200", "404", "422", "503"} <= set(paths["/v1/items/{item_id}/similar"]["get"]["responses"])
    models = schema["components"]["schemas"]
    assert models["RecommendRequest"]["properties"]["k"]["maximum"] == LIMITS["max_k"]
    assert models["RecommendRequest"]["properties"]["history"]["maxItems"] == LIMITS["max_history"]
    events = next(s for s in models["EventsRequest"]["properties"]["events"]["anyOf"] if s.get("type") == "array")
    assert events["maxItems"] == LIMITS["max_events"]
    assert "oneOf" in models["EventsRequest"]
    similar_k = next(p for p in paths["/v1/items/{item_id}/similar"]["get"]["parameters"] if p["name"] == "k")
    assert similar_k["schema"]["maximum"] == LIMITS["max_k"]
