"""The request path through HTTP, against a brute-force reference: real model, real index, real Redis."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.helpers import assert_same_ranking, brute_force, load_users, make_settings, serving_root
from training.artifacts import LoadedModel


@dataclass
class Served:
    client: TestClient
    redis_url: str
    root: Path
    model: LoadedModel
    model_version: str
    index_version: str
    users: pd.DataFrame
    catalog: pd.DataFrame

    def features(self, user_id: str) -> dict[str, Any]:
        row = self.users.loc[user_id]
        return {c: row[c] for c in self.users.columns if c != "history"}

    def history(self, user_id: str) -> list[str]:
        return [str(i) for i in self.users.loc[user_id, "history"]]

    def recommend(self, **body: Any) -> dict[str, Any]:
        response = self.client.post("/v1/recommendations", json=body)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def reference(
        self,
        user_id: str,
        k: int,
        history: list[str] | None = None,
        exclude_seen: bool = True,
        exclude: Collection[str] = (),
        allowed: Collection[str] | None = None,
    ) -> list[tuple[str, float]]:
        """The brute-force ranking of a stored user: its features, `history` (default: the stored one)."""
        history = self.history(user_id) if history is None else history
        excluded = {*(history if exclude_seen else ()), *exclude}
        features = self.features(user_id)
        return brute_force(
            self.model, user_id=user_id, features=features, history=history, k=k, exclude=excluded, allowed=allowed
        )

    def with_genre(self, genre: str) -> set[str]:
        return {str(item) for item, genres in self.catalog["genres"].items() if genre in list(genres)}


@pytest.fixture(scope="module")
def served(trained_model: LoadedModel, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root: Path = tmp_path_factory.mktemp("recommend")
    model_version, index_version = serving_root(trained_model, root)
    load_users(trained_model.users(), redis_url, "rec:", root / "data")
    with TestClient(create_app(make_settings(root, redis_url, "rec:"))) as client:
        yield Served(
            client,
            redis_url,
            root,
            trained_model,
            model_version,
            index_version,
            trained_model.users(),
            trained_model.catalog(),
        )


def test_recommendations_equal_brute_force_ranking_minus_seen_items(served: Served) -> None:
    for user_id in served.users.index[:6]:
        body = served.recommend(user_id=user_id, k=10)
        history = served.history(user_id)
        expected = served.reference(user_id, 10)
        assert body["path"] == "known_user"
        assert body["degraded"] is False
        assert (body["model_version"], body["index_version"]) == (served.model_version, served.index_version)
        assert not set(history) & {i["item_id"] for i in body["items"]}
        assert_same_ranking(body["items"], expected)


def test_exclude_seen_false_ranks_history_items_too(served: Served) -> None:
    user_id = served.users.index[0]
    body = served.recommend(user_id=user_id, k=20, exclude_seen=False)
    expected = served.reference(user_id, 20, exclude_seen=False)
    assert_same_ranking(body["items"], expected)


def test_batch_answers_like_single_calls_in_the_same_order(served: Served) -> None:
    requests: list[dict[str, Any]] = [
        {"user_id": served.users.index[1], "k": 5},
        {"k": 3},
        {"features": {"segment": "s2"}, "history": ["i3", "i7"], "k": 7},
        {"user_id": served.users.index[2], "k": 4, "filter": {"genres": ["g3"]}},
    ]
    response = served.client.post("/v1/recommendations/batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    responses = response.json()["responses"]
    assert [len(r["items"]) for r in responses] == [5, 3, 7, 4]
    for batched, request in zip(responses, requests, strict=True):
        single = served.recommend(**request)
        assert batched["path"] == single["path"]
        assert_same_ranking(batched["items"], [(i["item_id"], i["score"]) for i in single["items"]])


def test_events_change_the_next_recommendation(served: Served) -> None:
    user_id = served.users.index[20]
    before = served.recommend(user_id=user_id, k=10)["items"]
    clicked = [before[0]["item_id"], before[4]["item_id"], before[7]["item_id"]]
    events = [{"user_id": user_id, "item_id": item, "timestamp": 1_700_000_000 + i} for i, item in enumerate(clicked)]
    response = served.client.post("/v1/events", json={"events": events[:2]})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2}
    single = served.client.post("/v1/events", json=events[2])
    assert single.json() == {"accepted": 1}

    after = served.recommend(user_id=user_id, k=10)
    history = [*reversed(clicked), *served.history(user_id)]  # newest first
    expected = served.reference(user_id, 10, history=history)
    assert_same_ranking(after["items"], expected)
    assert not set(clicked) & {i["item_id"] for i in after["items"]}
    assert [i["item_id"] for i in after["items"]] != [i["item_id"] for i in before]


def test_excluded_ids_are_never_returned_and_the_list_is_refilled(served: Served) -> None:
    user_id = served.users.index[3]
    top = [i["item_id"] for i in served.recommend(user_id=user_id, k=10)["items"]]
    body = served.recommend(user_id=user_id, k=10, exclude=top[:3])
    expected = served.reference(user_id, 10, exclude=top[:3])
    assert_same_ranking(body["items"], expected)
    assert [i["item_id"] for i in body["items"]][:7] == top[3:]


@pytest.mark.parametrize("genre", ["g0", "g4"])
def test_attribute_filter_returns_the_best_matching_items_only(served: Served, genre: str) -> None:
    user_id = served.users.index[4]
    body = served.recommend(user_id=user_id, k=10, filter={"genres": [genre]})
    allowed = served.with_genre(genre)
    expected = served.reference(user_id, 10, allowed=allowed)
    assert {i["item_id"] for i in body["items"]} <= allowed
    assert_same_ranking(body["items"], expected)


def test_filter_matching_fewer_than_k_items_returns_exactly_those(served: Served) -> None:
    catalog = served.catalog
    year = int(catalog["year"].iloc[0])
    allowed = {str(i) for i in catalog.index[catalog["year"] == year]}
    body = served.recommend(k=50, filter={"year": [str(year)], "genres": ["g0", "g1", "g2", "g3", "g4", "g5"]})
    assert 0 < len(allowed) < 50
    expected = brute_force(served.model, user_id=None, features={}, history=[], k=50, allowed=allowed)
    assert_same_ranking(body["items"], expected)


def test_unknown_filter_attribute_is_422_naming_it(served: Served) -> None:
    response = served.client.post("/v1/recommendations", json={"k": 5, "filter": {"colour": ["red"]}})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "filter", "colour"]
    assert "genres" in error["msg"]


def test_unknown_feature_name_is_422_naming_it_in_single_and_batch_calls(served: Served) -> None:
    single = served.client.post("/v1/recommendations", json={"features": {"segmnet": "s1"}})
    assert single.status_code == 422
    assert single.json()["detail"][0]["loc"] == ["body", "features", "segmnet"]
    batch = served.client.post(
        "/v1/recommendations/batch", json={"requests": [{"k": 1}, {"features": {"segmnet": "s1"}}]}
    )
    assert batch.status_code == 422
    assert batch.json()["detail"][0]["loc"] == ["body", "requests", 1, "features", "segmnet"]


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "cold_start"),
        ({"user_id": "never-seen-user"}, "cold_start"),
        ({"user_id": "never-seen-user", "history": []}, "cold_start"),
        ({"user_id": "never-seen-user", "features": {"segment": "no-such-segment"}}, "features_only"),
        ({"features": {"segment": "s1", "region": None}}, "features_only"),
        ({"history": ["no-such-item", "i5"]}, "features_only"),
    ],
)
def test_cold_start_inputs_are_answered_not_errors(served: Served, body: dict[str, Any], path: str) -> None:
    result = served.recommend(**body, k=10)
    assert result["path"] == path
    assert len(result["items"]) == 10
    expected = brute_force(
        served.model,
        user_id=body.get("user_id"),
        features=body.get("features", {}),
        history=body.get("history", []),
        k=10,
        exclude=body.get("history", []),
    )
    assert_same_ranking(result["items"], expected)


def test_similar_items_rank_by_the_same_inner_product_and_skip_the_item(served: Served) -> None:
    response = served.client.get("/v1/items/i5/similar", params={"k": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    ids, vectors = served.model.item_embeddings()
    scores = vectors @ vectors[ids.index("i5")]
    expected = [(ids[i], float(scores[i])) for i in np.argsort(-scores, kind="stable") if ids[i] != "i5"][:6]
    assert body["item_id"] == "i5"
    assert_same_ranking(body["items"], expected)


def test_similar_items_of_an_unknown_item_is_404(served: Served) -> None:
    response = served.client.get("/v1/items/no-such-item/similar")
    assert response.status_code == 404
    assert "no-such-item" in response.json()["detail"]


def test_stored_features_the_model_does_not_take_are_ignored(served: Served) -> None:
    extra = pd.DataFrame(
        {"segment": ["s1"], "legacy_score": [0.7], "history": [["i1", "i2"]]},
        index=pd.Index(["user-with-extras"], name="user_id"),
    )
    load_users(extra, served.redis_url, "rec:", served.root)
    body = served.recommend(user_id="user-with-extras", k=5)
    assert body["path"] == "known_user"
    expected = brute_force(
        served.model,
        user_id="user-with-extras",
        features={"segment": "s1"},
        history=["i1", "i2"],
        k=5,
        exclude=["i1", "i2"],
    )
    assert_same_ranking(body["items"], expected)


def test_items_seen_before_the_capped_history_are_still_excluded(served: Served) -> None:
    settings = make_settings(served.root, served.redis_url, "seen:", max_history=3)
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/recommendations", json={"user_id": "heavy", "k": 6}).json()["items"]
        seen = [item["item_id"] for item in first]
        events = [{"user_id": "heavy", "item_id": item} for item in seen]
        assert client.post("/v1/events", json={"events": events}).json() == {"accepted": 6}
        body = client.post("/v1/recommendations", json={"user_id": "heavy", "k": 50}).json()
    # Only the 3 newest events feed the tower, but all 6 items were seen and none comes back.
    assert body["path"] == "known_user"
    assert not set(seen) & {item["item_id"] for item in body["items"]}
    assert len(body["items"]) == 50
