"""The Redis store on real servers: histories, bulk loading, record revisions, the embedded default and outages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from service.errors import StoreUnavailableError
from service.redis_server import _pid_alive, free_port
from service.store import FeatureStore, StoredUser


def test_histories_are_newest_first_unique_and_capped_while_seen_keeps_everything(
    redis_url: str, tmp_path: Path
) -> None:
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
