"""`service.recommender.Recommender` through the real app: micro-batched answers are exactly the unbatched ones, and
one bad request never fails its batch-mates."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import recommender
from service.app import create_app
from service.retriever import PreparedBatch
from tests.helpers import load_users, make_settings, serving_root
from training.artifacts import LoadedModel


@pytest.fixture(scope="module")
def served_root(
    trained_model: LoadedModel, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    root: Path = tmp_path_factory.mktemp("batching")
    serving_root(trained_model, root)
    load_users(trained_model.users(), redis_url, "batch:", root / "data")
    return root, redis_url


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
        batcher = app.state.services.recommender.batcher
        return [(r.status_code, r.json()) for r in responses], batcher.batches, batcher.items


@pytest.mark.parametrize("search_thread", [False, True])
def test_micro_batched_answers_equal_unbatched_ones(
    trained_model: LoadedModel,
    served_root: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    search_thread: bool,
) -> None:
    """Also with every batch's search in the search thread, as on a large index."""
    root, url = served_root
    bodies = _bodies(trained_model)
    alone, alone_batches, _ = asyncio.run(_answers(root, url, bodies, concurrent=False, batch_max=1))
    searched_in: set[str] = set()
    search = PreparedBatch.search

    def recorded_search(batch: PreparedBatch) -> None:
        if batch.rows_to_search:
            searched_in.add(threading.current_thread().name)
        search(batch)

    monkeypatch.setattr(PreparedBatch, "search", recorded_search)
    monkeypatch.setattr(recommender, "OFFLOAD_SEARCH_US", 0.0 if search_thread else math.inf)
    together, batches, items = asyncio.run(_answers(root, url, bodies, concurrent=True, batch_max=16))
    assert alone_batches == len(bodies)
    assert items == len(bodies) and batches < len(bodies) / 2, "concurrent requests were not batched"
    assert searched_in and all(name.startswith("twotower-search") == search_thread for name in searched_in)
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
