"""Operations: readiness, a Redis outage and recovery, hot swaps under load, refused artifacts, pinning and
metrics. Each test owns its artifacts root (it moves the ACTIVE_INDEX pointer) and, where it stops Redis, its
Redis server."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_server import EmbeddedRedis
from tests.helpers import (
    ADMIN_TOKEN,
    copy_model,
    derived_model,
    load_users,
    make_settings,
    publish_index,
    serving_root,
    wait_until,
)
from training.artifacts import ArtifactStore, LoadedModel
from training.redis_keys import RedisKeys


def _publish(url: str, prefix: str, version: str) -> None:
    """What the re-index job does after moving the pointer: SET the key and PUBLISH the version."""

    async def go() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            keys = RedisKeys(prefix)
            await client.set(keys.active_index, version)
            await client.publish(keys.index_published, version)
        finally:
            await client.aclose()

    asyncio.run(go())


def _metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_readiness_is_503_until_an_index_is_published_then_200(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_url, "ready:"))) as client:
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] == "not_ready"
        assert not_ready.json()["store"]["status"] == "ok"
        refused = client.post("/v1/recommendations", json={"k": 3})
        assert refused.status_code == 503
        assert "twotower reindex" in refused.json()["detail"]

        model_version, index_version = serving_root(trained_model, tmp_path)  # publish; the poller finds it
        wait_until(lambda: client.get("/readyz").status_code == 200)
        ready = client.get("/readyz").json()
        assert (ready["model_version"], ready["index_version"]) == (model_version, index_version)
        assert ready["items"] == trained_model.manifest["item_count"]
        assert client.post("/v1/recommendations", json={"k": 3}).status_code == 200


def test_redis_outage_degrades_recommendations_refuses_events_then_recovers(
    trained_model: LoadedModel, tmp_path: Path, start_redis: Callable[..., EmbeddedRedis]
) -> None:
    serving_root(trained_model, tmp_path)
    user_id = str(trained_model.users().index[0])
    statuses: list[int] = []
    server = start_redis(tmp_path / "redis")
    assert server.port is not None
    load_users(trained_model.users(), server.url, "out:", tmp_path / "data")
    with TestClient(create_app(make_settings(tmp_path, server.url, "out:", redis_timeout=0.2))) as client:

        def post(path: str, body: dict[str, Any]) -> Any:
            response = client.post(path, json=body)
            statuses.append(response.status_code)
            return response

        assert post("/v1/events", {"user_id": user_id, "item_id": "i1"}).status_code == 200
        server.stop()  # Redis goes away mid-test

        down = post("/v1/recommendations", {"user_id": user_id, "k": 5})
        assert down.status_code == 200
        assert down.json()["degraded"] is True
        assert len(down.json()["items"]) == 5
        refused = post("/v1/events", {"user_id": user_id, "item_id": "i2"})
        assert refused.status_code == 503
        assert "Redis is unreachable" in refused.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["degraded"] is True
        assert ready.json()["store"]["status"] == "degraded"
        assert _metric(client, "twotower_store_up") == 0
        assert _metric(client, "twotower_store_errors_total", operation="record_events") >= 1
        assert _metric(client, "twotower_recommendations_total", path="known_user", degraded="true") >= 1

        server.start()  # same port, same files: the AOF brings the data back
        wait_until(lambda: client.get("/readyz").json()["store"]["status"] == "ok")
        back = post("/v1/recommendations", {"user_id": user_id, "k": 5})
        assert back.json()["degraded"] is False
        assert back.json()["path"] == "known_user"
        assert "i1" not in {i["item_id"] for i in back.json()["items"]}  # the event written before the outage
        assert post("/v1/events", {"user_id": user_id, "item_id": "i2"}).status_code == 200
    assert 500 not in statuses


def test_a_frozen_redis_degrades_answers_without_stalling_probes_and_a_refused_event_stays_unwritten(
    trained_model: LoadedModel, tmp_path: Path, start_redis: Callable[..., EmbeddedRedis]
) -> None:
    serving_root(trained_model, tmp_path)
    user_id = str(trained_model.users().index[0])
    server = start_redis(tmp_path / "redis")
    assert server.pid is not None
    load_users(trained_model.users(), server.url, "frz:", tmp_path / "data")
    keys = RedisKeys("frz:")
    with TestClient(create_app(make_settings(tmp_path, server.url, "frz:", redis_timeout=0.2))) as client:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            refused = client.post("/v1/events", json={"user_id": user_id, "item_id": "frozen-item"})
            assert refused.status_code == 503
            started = time.monotonic()
            ready = client.get("/readyz")
            assert time.monotonic() - started < 0.1  # answers from the store's health, never waits on Redis
            assert ready.json()["store"]["status"] == "degraded"
            down = client.post("/v1/recommendations", json={"user_id": user_id, "k": 5})
            assert down.status_code == 200 and down.json()["degraded"] is True
        finally:
            os.kill(server.pid, signal.SIGCONT)
        wait_until(lambda: client.get("/readyz").json()["store"]["status"] == "ok")
        assert client.post("/v1/events", json={"user_id": user_id, "item_id": "after"}).status_code == 200

    async def logged() -> tuple[list[str], list[str]]:
        redis = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            history = await redis.lrange(keys.user_history(user_id), 0, -1)
            return history, [fields["item_id"] for _, fields in await redis.xrange(keys.events)]
        finally:
            await redis.aclose()

    history, log = asyncio.run(logged())
    assert "frozen-item" not in history and history[0] == "after"
    assert log == ["after"]  # what was answered 503 was not applied when Redis resumed


def test_hot_swap_under_concurrent_requests_loses_none_and_never_mixes_versions(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_a, index_a = serving_root(trained_model, tmp_path)
    model_b = derived_model(trained_model, tmp_path, seed=2)
    index_b = publish_index(tmp_path, model_b, activate=False)
    prefix = "swap:"
    # Poll slowly: the swap below must come from the Redis notification.
    settings = make_settings(tmp_path, redis_url, prefix, poll_seconds=30)
    results: list[tuple[int, Any]] = []
    stop = threading.Event()
    user_ids = [str(u) for u in trained_model.users().index[:8]]

    with TestClient(create_app(settings)) as client:

        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 3 == 0:
                    body = {"requests": [{"user_id": u, "k": 5} for u in user_ids[:3]]}
                    response = client.post("/v1/recommendations/batch", json=body)
                    payload = response.json()["responses"] if response.status_code == 200 else response.text
                else:
                    body = {"user_id": user_ids[(worker + i) % len(user_ids)], "k": 10}
                    response = client.post("/v1/recommendations", json=body)
                    payload = [response.json()] if response.status_code == 200 else response.text
                results.append((response.status_code, payload))

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)
            ArtifactStore(tmp_path).set_active_index(index_b)
            _publish(redis_url, prefix, index_b)
            wait_until(lambda: client.get("/readyz").json()["index_version"] == index_b)
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        swaps_ok = _metric(client, "twotower_swaps_total", result="ok")

    failures = [payload for status, payload in results if status != 200]
    assert not failures, failures[:3]
    pairs = {(r["model_version"], r["index_version"]) for _, payload in results for r in payload}
    assert pairs == {(model_a, index_a), (model_b, index_b)}
    assert swaps_ok == 2  # start-up + the published swap


def test_corrupted_and_mismatched_indexes_are_refused_while_the_old_pair_keeps_serving(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_a, index_a = serving_root(trained_model, tmp_path)
    store = ArtifactStore(tmp_path)
    with TestClient(create_app(make_settings(tmp_path, redis_url, "refuse:"))) as client:
        corrupted = publish_index(tmp_path, model_a, activate=False)
        (store.index_dir(corrupted) / "item_ids.json").write_text('["i0"]\n')
        store.set_active_index(corrupted)
        wait_until(lambda: _metric(client, "twotower_swaps_total", result="failed") == 1)
        ready = client.get("/readyz").json()
        assert ready["index_version"] == index_a
        assert corrupted in ready["last_swap_error"]
        assert "corrupted" in ready["last_swap_error"]
        served = client.post("/v1/recommendations", json={"k": 5})
        assert (served.status_code, served.json()["index_version"]) == (200, index_a)

        # An index whose manifest names model B but whose vectors come from model A.
        model_b = derived_model(trained_model, tmp_path, seed=3)
        _, vectors_a = trained_model.item_embeddings()
        mismatched = publish_index(tmp_path, model_b, vectors=vectors_a)
        wait_until(lambda: _metric(client, "twotower_swaps_total", result="failed") == 2)
        assert "item vectors differ" in client.get("/readyz").json()["last_swap_error"]
        assert client.post("/v1/recommendations", json={"k": 5}).json()["model_version"] == model_a
        assert mismatched in client.get("/readyz").json()["last_swap_error"]

        good = publish_index(tmp_path, model_b)  # the next good publication is taken
        wait_until(lambda: client.get("/readyz").json()["index_version"] == good)
        assert client.get("/readyz").json()["last_swap_error"] is None


def test_admin_pin_holds_a_version_until_reload(trained_model: LoadedModel, tmp_path: Path, redis_url: str) -> None:
    model_version = copy_model(trained_model, tmp_path)
    first = publish_index(tmp_path, model_version)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    settings = make_settings(tmp_path, redis_url, "pin:", admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings)) as client:
        second = publish_index(tmp_path, model_version)
        wait_until(lambda: client.get("/readyz").json()["index_version"] == second)

        pinned = client.post("/v1/admin/pin", json={"index_version": first}, headers=auth)
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["pinned"] == first
        third = publish_index(tmp_path, model_version)
        time.sleep(0.4)  # several poll periods: the pin holds
        assert client.get("/readyz").json()["index_version"] == first
        assert client.get("/readyz").json()["pinned"] == first

        reloaded = client.post("/v1/admin/reload", headers=auth)
        assert reloaded.json() == {
            "model_version": model_version,
            "index_version": third,
            "changed": True,
            "pinned": None,
        }


def test_metrics_expose_latency_paths_versions_and_swaps(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_version, index_version = serving_root(trained_model, tmp_path)
    with TestClient(create_app(make_settings(tmp_path, redis_url, "metrics:"))) as client:
        client.post("/v1/recommendations", json={"k": 3})
        client.post("/v1/recommendations", json={"k": 0})
        client.get("/v1/items/i1/similar")
        wait_until(lambda: client.app.state.services.store.cache.live)  # type: ignore[attr-defined]
        client.post("/v1/recommendations", json={"user_id": "nobody", "k": 3})  # read from Redis, cached absent
        client.post("/v1/recommendations", json={"user_id": "nobody", "k": 3})  # from the cache
        text = client.get("/metrics").text
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert (
        'twotower_http_request_duration_seconds_count{method="POST",route="/v1/recommendations",status="200"} 3.0'
        in text
    )
    assert 'route="/v1/recommendations",status="422"' in text
    assert 'route="/v1/items/{item_id}/similar",status="200"' in text
    assert 'twotower_recommendations_total{degraded="false",path="cold_start"} 3.0' in text
    # one request at a time: three batches of one (the 422 never reached the batcher)
    assert 'twotower_batch_requests_bucket{le="1.0"} 3.0' in text and "twotower_batch_requests_count 3.0" in text
    assert f'twotower_active_info{{index_version="{index_version}",model_version="{model_version}"}} 1.0' in text
    assert 'twotower_swaps_total{result="ok"} 1.0' in text
    assert 'twotower_swaps_total{result="failed"} 0.0' in text
    assert "twotower_store_errors_total" in text
    assert "twotower_index_items 300.0" in text
    assert 'twotower_user_cache_lookups_total{result="hit"} 1.0' in text
    assert 'twotower_user_cache_lookups_total{result="miss"} 1.0' in text
    assert "twotower_user_cache_live 1.0" in text
