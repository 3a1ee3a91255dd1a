"""The Redis store on real servers: histories, capped seen items, the event log, bulk loading, record revisions,
the embedded default, and outages (a Redis gone, a Redis frozen)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import redis.asyncio as aioredis

from service.errors import StoreUnavailableError
from service.redis_server import EmbeddedRedis, _pid_alive, free_port
from service.store import FeatureStore, StoredUser


def test_histories_are_newest_first_unique_and_capped_while_seen_keeps_more(redis_url: str, tmp_path: Path) -> None:
    async def go() -> StoredUser:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="cap:", max_history=3)
        await store.start()
        try:
            await store.record_events([("u1", "a"), ("u1", "b"), ("u1", "c")])
            await store.record_events([("u1", "a"), ("u1", "d"), ("u2", "x")])
            return (await store.get_users(["u1", "u2", "nobody"]))["u1"]
        finally:
            await store.close()

    user = asyncio.run(go())
    assert user.history == ["d", "a", "c"]
    assert user.seen == {"a", "b", "c", "d"}  # "b" fell out of the capped history but was still seen


def test_bulk_load_writes_features_and_histories_and_replaces_old_ones(redis_url: str, tmp_path: Path) -> None:
    users = pd.DataFrame(
        {
            "age": [31, None],
            "segment": ["s1", "s2"],
            "tags": [["x", "y"], []],
            "history": [["i3", "i2", "i1"], []],
        },
        index=pd.Index(["u1", "u2"], name="user_id"),
    )
    progress: list[int] = []

    async def go() -> tuple[int, StoredUser, StoredUser]:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="bulk:", max_history=2)
        await store.start()
        try:
            await store.record_events([("u1", "stale")])
            written = await store.load_users(users, chunk=1, on_progress=progress.append)
            stored = await store.get_users(["u1", "u2"])
            return written, stored["u1"], stored["u2"]
        finally:
            await store.close()

    written, u1, u2 = asyncio.run(go())
    assert written == 2
    assert progress == [1, 1]
    assert u1.features == {"age": 31.0, "segment": "s1", "tags": ["x", "y"]}
    assert u1.history == ["i3", "i2"]  # capped: the tower's input
    assert u1.seen == {"i3", "i2", "i1"}  # the old event "stale" was replaced; everything loaded is seen
    assert u2.features == {"segment": "s2"}
    assert u2.history == [] and u2.seen == frozenset()


def test_an_unreachable_store_starts_degraded_refuses_calls_and_never_hangs(tmp_path: Path) -> None:
    async def go() -> None:
        store = FeatureStore(f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path, timeout=0.2)
        await store.start()  # does not raise: the service starts and serves without its store
        try:
            assert store.health.status == "degraded"
            with pytest.raises(StoreUnavailableError, match="Redis is unreachable"):
                await store.get_users(["u1"])
            with pytest.raises(StoreUnavailableError):
                await store.record_events([("u1", "i1")])
            assert not await store.ping()
        finally:
            await store.close()

    asyncio.run(go())


def test_embedded_redis_is_started_owned_stopped_and_persists(tmp_path: Path) -> None:
    async def write() -> int | None:
        store = FeatureStore(None, data_dir=tmp_path, prefix="emb:")
        await store.start()
        assert store.health.status == "ok" and store.backend == "embedded"
        await store.record_events([("u1", "i1"), ("u1", "i2")])
        assert store.embedded is not None
        pid = store.embedded.pid
        await store.close()
        return pid

    async def read() -> list[str]:
        store = FeatureStore(None, data_dir=tmp_path, prefix="emb:")
        await store.start()
        try:
            return (await store.get_users(["u1"]))["u1"].history
        finally:
            await store.close()

    pid = asyncio.run(write())
    assert pid is not None and not _pid_alive(pid)  # stopped with the store
    assert (tmp_path / "redis").is_dir()
    assert asyncio.run(read()) == ["i2", "i1"]  # persisted under the data dir


def test_a_records_revision_changes_with_its_content_and_only_then(redis_url: str, tmp_path: Path) -> None:
    async def go() -> list[str]:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="rev:")
        await store.start()
        try:
            revisions = []
            await store.record_events([("u1", "a"), ("u1", "b")])
            revisions.append((await store.get_users(["u1"]))["u1"].revision)
            revisions.append((await store.get_users(["u1"]))["u1"].revision)  # unchanged: the same revision
            await store.record_events([("u1", "a")])  # "a" moves to the front: another history
            revisions.append((await store.get_users(["u1"]))["u1"].revision)
            return revisions
        finally:
            await store.close()

    first, again, moved = asyncio.run(go())
    assert first == again and moved != first


def test_seen_items_are_capped_to_the_latest_and_an_old_seen_set_is_converted(redis_url: str, tmp_path: Path) -> None:
    async def go() -> tuple[StoredUser, StoredUser, StoredUser]:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="seen:", max_history=2, max_seen=3)
        await store.start()
        try:
            await store.record_events([("u1", item) for item in "abcde"])
            capped = (await store.get_users(["u1"]))["u1"]
            # a plain set, as versions before the cap wrote it, read as a sample of the cap's size
            await store.client.sadd(store.keys.user_seen("old"), *[f"o{i}" for i in range(10)])
            legacy = (await store.get_users(["old"]))["old"]
            await store.record_events([("old", "new")])
            converted = (await store.get_users(["old"]))["old"]
            return capped, legacy, converted
        finally:
            await store.close()

    capped, legacy, converted = asyncio.run(go())
    assert capped.seen == {"c", "d", "e"} and capped.history == ["e", "d"]
    assert len(legacy.seen) == 3 and legacy.seen <= {f"o{i}" for i in range(10)}
    assert "new" in converted.seen and len(converted.seen) == 3


def test_every_accepted_event_is_in_the_log_with_its_timestamp(redis_url: str, tmp_path: Path) -> None:
    async def go() -> list[dict[str, str]]:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="log:")
        await store.start()
        try:
            await store.record_events([("u1", "a", 1700000000.5), ("u2", "b", None)])
            await store.record_events([("u1", "c")])
            return [fields for _, fields in await store.client.xrange(store.keys.events)]
        finally:
            await store.close()

    before = time.time()
    logged = asyncio.run(go())
    assert [(e["user_id"], e["item_id"]) for e in logged] == [("u1", "a"), ("u2", "b"), ("u1", "c")]
    assert float(logged[0]["timestamp"]) == 1700000000.5
    assert all(abs(float(e["timestamp"]) - before) < 60 for e in logged[1:])  # none given: Redis's clock


def test_a_redelivered_call_is_applied_once(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))  # both calls carry the same call id

    async def go() -> int:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="again:")
        await store.start()
        try:
            await store.record_events([("u1", "a")])
            await store.record_events([("u1", "a")])
            return int(await store.client.xlen(store.keys.events))
        finally:
            await store.close()

    assert asyncio.run(go()) == 1


def test_a_frozen_redis_costs_one_timeout_and_a_call_it_answered_late_writes_nothing(
    tmp_path: Path, start_redis: Callable[..., EmbeddedRedis]
) -> None:
    server = start_redis()
    assert server.pid is not None
    timeout = 0.3

    async def go() -> None:
        store = FeatureStore(server.url, data_dir=tmp_path, prefix="frozen:", timeout=timeout)
        await store.start()
        reader = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            await store.record_events([("u1", "before")])
            os.kill(server.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    await store.record_events([("u1", "late")])  # sent, then waited on: 503 to its caller
                assert time.monotonic() - started < 2 * timeout  # one timeout, no retry
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="not attempted"):
                    await store.get_users(["u1"])
                assert time.monotonic() - started < 0.05  # fails fast while the outage lasts
                await asyncio.sleep(timeout)
            finally:
                os.kill(server.pid, signal.SIGCONT)  # Redis resumes and runs what was queued
            deadline = time.monotonic() + 5
            while store.health.status != "ok" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert store.health.status == "ok"  # the monitor noticed without a request
            assert await reader.lrange(store.keys.user_history("u1"), 0, -1) == ["before"]
            assert [f["item_id"] for _, f in await reader.xrange(store.keys.events)] == ["before"]
        finally:
            await reader.aclose()
            await store.close()

    asyncio.run(go())


def test_close_finishes_even_when_a_background_task_loses_a_cancel(redis_url: str, tmp_path: Path) -> None:
    """Python 3.11 can lose a cancel that meets an expiring timeout (redis-py's pub/sub read waits under one); a
    task that swallows the first cancel must not hold `close` (and the process: `load-features` hung on it)."""

    async def go() -> float:
        store = FeatureStore(redis_url, data_dir=tmp_path, prefix="close:")
        await store.start()
        cancels = 0

        async def swallows_one_cancel() -> None:
            nonlocal cancels
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cancels += 1
                    if cancels > 1:
                        raise

        store._tasks.append(asyncio.create_task(swallows_one_cancel()))
        await asyncio.sleep(0)
        started = time.perf_counter()
        await asyncio.wait_for(store.close(), timeout=10)
        assert cancels == 2
        return time.perf_counter() - started

    assert asyncio.run(go()) < 5
