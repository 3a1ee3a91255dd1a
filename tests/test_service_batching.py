"""Micro-batching returns exactly what unbatched calls return; one bad request never fails its batch-mates; the
directly written JSON is the `RecommendResponse` JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.batcher import MicroBatcher
from service.retriever import Recommendation
from service.routes import recommendation_json
from service.schemas import RecommendResponse, ScoredItem
from tests.test_service_support import load_users, make_settings, redis_server, serving_root
from training.artifacts import LoadedModel


@pytest.fixture(scope="module")
def served_root(trained_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root: Path = tmp_path_factory.mktemp("batching")
    serving_root(trained_model, root)
    with redis_server(root / "redis") as server:
        load_users(trained_model, server.url, "batch:", root / "data")
        yield root, server.url


def _bodies(model: LoadedModel) -> list[dict[str, Any]]:
    users = model.users()
    bodies: list[dict[str, Any]] = []
    for i, user_id in enumerate(users.index[:12]):
        history = [str(item) for item in users.loc[user_id, "history"]][: 3 + i]
        bodies += [
            {"user_id": str(user_id), "k": 5 + i % 3},  # known: Redis-held history
            {"features": {"segment": str(users.loc[user_id, "segment"])}, "history": history, "k": 7},
            {"user_id": f"nobody-{i}", "k": 4},  # cold
        ]
    bodies.append({"k": 10, "exclude_seen": False, "exclude": ["i1", "i2"]})
    return bodies


async def _answers(root: Path, url: str, bodies: list[dict[str, Any]], *, concurrent: bool, **settings: Any) -> Any:
    app = create_app(make_settings(root, url, "batch:", **settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if concurrent:
                responses = await asyncio.gather(*(client.post("/v1/recommendations", json=b) for b in bodies))
            else:
                responses = [await client.post("/v1/recommendations", json=b) for b in bodies]
        batcher = app.state.services.batcher
        return [(r.status_code, r.json()) for r in responses], batcher.batches, batcher.items


def test_micro_batched_answers_equal_unbatched_ones(trained_model: LoadedModel, served_root: tuple[Path, str]) -> None:
    root, url = served_root
    bodies = _bodies(trained_model)
    alone, alone_batches, _ = asyncio.run(_answers(root, url, bodies, concurrent=False, batch_max=1))
    together, batches, items = asyncio.run(_answers(root, url, bodies, concurrent=True, batch_max=16))
    assert alone_batches == len(bodies)
    assert items == len(bodies) and batches < len(bodies) / 2, "concurrent requests were not batched"
    for (status_a, a), (status_b, b) in zip(alone, together, strict=True):
        assert status_a == status_b == 200
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        assert [i["score"] for i in a["items"]] == pytest.approx([i["score"] for i in b["items"]], rel=1e-6, abs=1e-7)
        assert {**a, "items": None} == {**b, "items": None}  # path, versions, degraded, user_id


def test_a_bad_request_in_a_batch_gets_its_own_422_and_the_others_are_answered(
    trained_model: LoadedModel, served_root: tuple[Path, str]
) -> None:
    root, url = served_root
    bodies = _bodies(trained_model)[:6]
    bodies.insert(3, {"features": {"not_a_feature": "x"}, "k": 3})
    answers, batches, _ = asyncio.run(_answers(root, url, bodies, concurrent=True, batch_max=16))
    assert batches < len(bodies)
    assert [status for status, _ in answers] == [200, 200, 200, 422, 200, 200, 200]
    assert answers[3][1]["detail"][0]["loc"] == ["body", "features", "not_a_feature"]


def test_recommendation_json_is_the_response_model_json() -> None:
    result = Recommendation(
        item_ids=["a", 'quote"d', "ünï"],
        scores=[0.1234567, -2.5e-08, 3.0],
        path="known_user",
        model_version="m1",
        index_version="idx-1",
    )
    for user_id, degraded in ((None, False), ("u\\1", True)):
        model = RecommendResponse(
            user_id=user_id,
            items=[ScoredItem(item_id=i, score=s) for i, s in zip(result.item_ids, result.scores, strict=True)],
            model_version="m1",
            index_version="idx-1",
            path="known_user",
            degraded=degraded,
            exact_fallback=False,
        )
        written = recommendation_json(user_id, result, degraded)
        assert json.loads(written) == json.loads(model.model_dump_json())
        assert list(json.loads(written)) == list(RecommendResponse.model_fields)


def test_batcher_isolates_item_errors_and_batches_concurrent_submits() -> None:
    seen: list[list[int]] = []

    async def process(items: Any) -> list[int | BaseException]:
        seen.append(list(items))
        await asyncio.sleep(0.001)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def run() -> list[Any]:
        batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch=4)
        return await asyncio.gather(*(batcher.submit(i) for i in [1, 2, -3, 4, 5, 6]), return_exceptions=True)

    results = asyncio.run(run())
    assert results[:2] == [10, 20] and results[3:] == [40, 50, 60]
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad -3"
    assert [len(batch) for batch in seen] == [4, 2]
