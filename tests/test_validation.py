"""Input handling and the admin gate: malformed input is a 422 naming the field, oversize bodies a 413,
admin calls need the bearer token and vanish (404) when none is configured. Nothing here may answer 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers import ADMIN_TOKEN, make_settings, serving_root
from training.artifacts import LoadedModel

LIMITS = {"max_k": 50, "max_history": 20, "max_exclude": 5, "max_batch": 3, "max_events": 5, "max_body_bytes": 4096}


@pytest.fixture(scope="module")
def root(trained_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("validation")
    serving_root(trained_model, root)
    return root


@pytest.fixture(scope="module")
def client(root: Path, redis_url: str) -> Iterator[TestClient]:
    settings = make_settings(root, redis_url, "val:", admin_token=ADMIN_TOKEN, **LIMITS)
    with TestClient(create_app(settings)) as client:
        yield client


def _locs(response: Any) -> list[list[Any]]:
    return [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"k": 0}, ["body", "k"]),
        ({"k": 51}, ["body", "k"]),
        ({"k": "ten"}, ["body", "k"]),
        ({"k": 1.5}, ["body", "k"]),
        ({"user_id": 123}, ["body", "user_id"]),
        ({"user_id": ""}, ["body", "user_id"]),
        ({"user_id": "u" * 257}, ["body", "user_id"]),
        ({"history": [f"i{i}" for i in range(21)]}, ["body", "history"]),
        ({"history": ["i" * 300]}, ["body", "history", 0]),
        ({"exclude": [f"i{i}" for i in range(6)]}, ["body", "exclude"]),
        ({"exclude_seen": "maybe"}, ["body", "exclude_seen"]),
        ({"exlude": ["i1"]}, ["body", "exlude"]),
        ({"features": ["segment"]}, ["body", "features"]),
        ({"filter": {"genres": []}}, ["body", "filter", "genres"]),
        ({"filter": {"genres": "g1"}}, ["body", "filter", "genres"]),
    ],
)
def test_malformed_recommendation_requests_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], loc: list[Any]
) -> None:
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 422, response.text
    assert loc in _locs(response)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"requests": []}, ["body", "requests"]),
        ({"requests": [{"k": 1}] * 4}, ["body", "requests"]),
        ({"requests": [{"k": 1}, {"k": 0}]}, ["body", "requests", 1, "k"]),
        ({"requests": [{"k": 1}, {"k": 51}]}, ["body", "requests", 1, "k"]),
        ({"requests": [{"history": ["i1"] * 21}]}, ["body", "requests", 0, "history"]),
        ({"request": [{"k": 1}]}, ["body", "request"]),
    ],
)
def test_malformed_batches_are_422_naming_the_field(client: TestClient, body: dict[str, Any], loc: list[Any]) -> None:
    response = client.post("/v1/recommendations/batch", json=body)
    assert response.status_code == 422, response.text
    assert loc in _locs(response)


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"user_id": "u1"}, ["body"], "item_id"),
        ({"item_id": "i1"}, ["body"], "user_id"),
        ({"user_id": "u1", "item_id": "i1", "events": [{"user_id": "u1", "item_id": "i1"}]}, ["body"], "not both"),
        ({"events": [{"user_id": "u1"}]}, ["body", "events", 0, "item_id"], "required"),
        ({"events": [{"user_id": "u1", "item_id": "i1"}] * 6}, ["body", "events"], "at most 5"),
        ({"user_id": "u1", "item_id": "i1", "timestamp": "yesterday"}, ["body", "timestamp"], "number"),
    ],
)
def test_malformed_events_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], loc: list[Any], words: str
) -> None:
    response = client.post("/v1/events", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc and words in e["msg"] for e in errors), errors


@pytest.mark.parametrize("k", ["0", "51", "many"])
def test_similar_items_k_out_of_bounds_is_422(client: TestClient, k: str) -> None:
    response = client.get("/v1/items/i1/similar", params={"k": k})
    assert response.status_code == 422
    assert ["query", "k"] in _locs(response)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"a string"'])
def test_bodies_that_are_not_a_json_object_are_422(client: TestClient, content: bytes) -> None:
    response = client.post("/v1/recommendations", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_an_oversize_body_is_413(client: TestClient) -> None:
    body = {"history": [f"item-{i:06d}" for i in range(400)]}  # ~6 kB > max_body_bytes=4096
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]  # JSON like every error, and it says the limit

    def streamed() -> Iterator[bytes]:  # no content-length: the limit holds while the body streams in
        yield b'{"history": ['
        for i in range(400):
            yield f'"item-{i:06d}",'.encode()
        yield b'"x"]}'

    chunked = client.post("/v1/recommendations", content=streamed(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert "content-length" not in chunked.request.headers
    assert "4096 bytes" in chunked.json()["detail"]
    ok = client.post("/v1/recommendations", json={"k": 2})
    assert ok.status_code == 200


def test_admin_calls_without_the_right_token_are_401(client: TestClient) -> None:
    missing = client.post("/v1/admin/reload")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v1/admin/reload", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401
    basic = client.post("/v1/admin/reload", headers={"Authorization": f"Basic {ADMIN_TOKEN}"})
    assert basic.status_code == 401
    pin = client.post("/v1/admin/pin", json={"index_version": "x"}, headers={"Authorization": "Bearer nope"})
    assert pin.status_code == 401


def test_admin_reload_with_the_token_reloads_the_active_pair(client: TestClient) -> None:
    response = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    ready = client.get("/readyz").json()
    assert response.json() == {
        "model_version": ready["model_version"],
        "index_version": ready["index_version"],
        "changed": False,
        "pinned": None,
    }


@pytest.mark.parametrize(("version", "status"), [("../../etc", 422), (".hidden", 422), ("idx-does-not-exist", 404)])
def test_admin_pin_refuses_bad_or_missing_versions(client: TestClient, version: str, status: int) -> None:
    response = client.post(
        "/v1/admin/pin", json={"index_version": version}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert response.status_code == status, response.text
    assert client.get("/readyz").status_code == 200


def test_admin_endpoints_are_404_when_no_token_is_configured(root: Path, redis_url: str) -> None:
    with TestClient(create_app(make_settings(root, redis_url, "val-noadmin:"))) as client:
        for path in ("/v1/admin/reload", "/v1/admin/pin"):
            response = client.post(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert response.status_code == 404
            assert "disabled" in response.json()["detail"]
        assert "/v1/admin/reload" not in client.get("/openapi.json").json()["paths"]


def test_settings_refuse_a_short_admin_token_and_treat_empty_as_unset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(artifacts=tmp_path, admin_token="changeme")
    assert Settings(artifacts=tmp_path, admin_token="", redis_url="").admin_token is None
    with pytest.raises(ValueError, match="redis://"):
        Settings(artifacts=tmp_path, redis_url="http://localhost:6379")


def test_openapi_documents_the_v1_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/recommendations", "/v1/recommendations/batch", "/v1/events", "/v1/items/{item_id}/similar"):
        assert path in paths
