"""The per-process user cache: its rules alone (a fake clock), then on a real Redis with several stores, as
several service processes would run: a write through any of them reaches every cache; an outage turns it off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from service.redis_server import EmbeddedRedis
from service.store import FeatureStore, StoredUser
from service.user_cache import UserCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live_cache(ttl: float = 10.0, size: int = 100) -> tuple[UserCache[str], Clock]:
    clock = Clock()
    cache: UserCache[str] = UserCache(ttl, size, clock)
    cache.set_live(True)
    return cache, clock


def test_a_read_is_served_from_the_cache_until_it_expires_and_absent_users_are_cached_too() -> None:
    cache, clock = live_cache(ttl=10.0)
    assert cache.lookup(["u1", "nobody"]) == ({}, ["u1", "nobody"])
    with cache.reading() as keep:
        keep({"u1": "data-1", "nobody": None})
    assert cache.lookup(["u1", "nobody", "u2"]) == ({"u1": "data-1"}, ["u2"])  # "nobody" is known absent
    clock.now += 10.0
    assert cache.lookup(["u1", "nobody"]) == ({}, ["u1", "nobody"])  # expired
    assert (cache.hits, cache.misses) == (2, 5)


def test_an_invalidation_during_a_read_keeps_that_read_out_of_the_cache() -> None:
    cache, _ = live_cache()
    with cache.reading() as keep:
        cache.invalidate(["u1"])  # a write landed while the read was in flight: its reply may predate it
        keep({"u1": "maybe-stale", "u2": "fresh"})
    assert cache.lookup(["u1", "u2"]) == ({"u2": "fresh"}, ["u1"])
    with cache.reading() as keep:  # a read begun after the invalidation is stored again
        keep({"u1": "new"})
    assert cache.lookup(["u1"]) == ({"u1": "new"}, [])


def test_a_clear_or_a_lost_subscription_keeps_in_flight_reads_out_and_the_cache_off() -> None:
    cache, _ = live_cache()
    with cache.reading() as keep:
        cache.clear()
        keep({"u1": "maybe-stale"})
    assert cache.lookup(["u1"]) == ({}, ["u1"])
    with cache.reading() as keep:
        keep({"u1": "data"})
    cache.set_live(False)  # invalidations may be missed from now on: nothing is served, nothing stored
    assert not cache.live and len(cache) == 0
    with cache.reading() as keep:
        keep({"u1": "data"})
    assert cache.lookup(["u1"]) == ({}, ["u1"]) and len(cache) == 0


def test_the_cache_holds_at_most_its_size_dropping_the_oldest_and_can_be_disabled() -> None:
    cache, _ = live_cache(size=2)
    for user in ("u1", "u2", "u3"):
        with cache.reading() as keep:
            keep({user: user})
    assert cache.lookup(["u1", "u2", "u3"]) == ({"u2": "u2", "u3": "u3"}, ["u1"])
    disabled: UserCache[str] = UserCache(0.0, 100)
    disabled.set_live(True)
    assert not disabled.live


# --------------------------------------------------------------------------- on a real Redis


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.01)
    return False


async def started(url: str, tmp_path: Path, prefix: str, cache_seconds: float = 300.0) -> FeatureStore:
    store = FeatureStore(url, data_dir=tmp_path, prefix=prefix, cache_seconds=cache_seconds)
    await store.start()
    assert await eventually(lambda: asyncio.sleep(0, store.cache.live)), "the cache never went live"
    return store


def test_a_write_through_one_process_reaches_the_cache_of_another(redis_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        reader, writer = await started(redis_url, tmp_path, "mp:"), await started(redis_url, tmp_path, "mp:")
        try:
            await writer.record_events([("u1", "a")])
            assert (await reader.get_users(["u1", "cold"]))["u1"].history == ["a"]

            async def both_cached() -> bool:  # a read that overlapped the write's notice is not kept: read again
                await reader.get_users(["u1", "cold"])
                return reader.cache.lookup(["u1", "cold"])[1] == []  # "cold" cached as absent

            assert await eventually(both_cached)
            await writer.record_events([("u1", "b"), ("cold", "c")])
            # the reader never hears of the write but through users_changed; it must not keep the old copies
            assert await eventually(lambda: _history(reader, "u1", ["b", "a"])), "the reader kept its stale copy"
            assert (await reader.get_users(["cold"]))["cold"].history == ["c"]
            assert (await writer.get_users(["u1"]))["u1"].history == ["b", "a"]  # the writer reads its own write
            await writer.load_users(_table({"u1": ["z"]}))
            assert await eventually(lambda: _history(reader, "u1", ["z"]))
            assert reader.cache.hits > 0
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(go())


def test_a_writer_outside_the_store_is_seen_once_it_publishes_or_the_entry_expires(
    redis_url: str, tmp_path: Path
) -> None:
    async def go() -> None:
        store = await started(redis_url, tmp_path, "ext:", cache_seconds=0.5)
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            await raw.lpush(store.keys.user_history("u1"), "a")
            assert (await store.get_users(["u1"]))["u1"].history == ["a"]
            await raw.lpush(store.keys.user_history("u1"), "b")  # no PUBLISH: the cached copy stands until it expires
            assert (await store.get_users(["u1"]))["u1"].history == ["a"]
            assert await eventually(lambda: _history(store, "u1", ["b", "a"]), seconds=3.0)
            await store.get_users(["u1"])
            await raw.lpush(store.keys.user_history("u1"), "c")
            await raw.publish(store.keys.users_changed, '["u1"]')  # the documented way for other writers
            assert await eventually(lambda: _history(store, "u1", ["c", "b", "a"]), seconds=0.4)
        finally:
            await raw.aclose()
            await store.close()

    asyncio.run(go())


def test_the_cache_is_off_while_redis_is_down_and_back_on_after(
    tmp_path: Path, start_redis: Callable[..., EmbeddedRedis]
) -> None:
    server = start_redis()

    async def go() -> None:
        store = await started(server.url, tmp_path, "down:")
        try:
            await store.record_events([("u1", "a")])
            await store.get_users(["u1"])
            server.stop()
            assert await eventually(lambda: asyncio.sleep(0, not store.cache.live))
            assert len(store.cache) == 0  # nothing cached survives an outage: invalidations were missed
            server.start()
            assert await eventually(lambda: asyncio.sleep(0, store.cache.live), seconds=10.0)
            assert (await store.get_users(["u1"]))["u1"].history == ["a"]
        finally:
            await store.close()

    asyncio.run(go())


async def _history(store: FeatureStore, user: str, expected: list[str]) -> bool:
    stored: StoredUser | None = (await store.get_users([user])).get(user)
    return stored is not None and stored.history == expected


def _table(histories: dict[str, list[str]]) -> object:
    import pandas as pd

    return pd.DataFrame({"history": list(histories.values())}, index=pd.Index(list(histories), name="user_id"))
