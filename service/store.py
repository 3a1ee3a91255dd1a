"""Online state in Redis: users' features, recent histories and seen items, read per request and written per
event, through ONE redis-py asyncio client whether Redis is external (`TWOTOWER_REDIS_URL`) or the embedded
server (`service.redis_server`) the store starts, owns and stops. Key names are `training.redis_keys.RedisKeys`.

Used by the service (reads per request, writes per event) and by `twotower load-features` (bulk writes).

Health: every call updates `health` (ok / degraded with the error). A failed call raises
`StoreUnavailableError` and nothing it wrote is acknowledged. After a failure, calls fail fast for a second
rather than each waiting out a timeout; then the next call (or any `ping`, as /readyz does) tries Redis again,
and the first that succeeds marks the store ok: it recovers by itself when Redis comes back (the client
reconnects on demand).

Reads go through a per-process `UserCache` when one is configured (`cache_seconds > 0`, the service's default):
`start()` then also follows the users-changed channel, and the cache serves only while that subscription is up.
Every record read carries a `revision`, a digest of its content: two reads with the same revision hold the same
record, which is what lets the retriever reuse what it derived from one (service/retriever.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service.errors import StoreUnavailableError
from service.redis_server import EmbeddedRedis
from service.user_cache import UserCache
from training.redis_keys import DEFAULT_PREFIX, RedisKeys

log = logging.getLogger(__name__)

NOT_STARTED = "not started"
# After a failed call, further calls fail fast for this long (probes excepted) rather than each waiting out the
# connect timeout; the first call after it tries Redis again.
OUTAGE_BACKOFF_SECONDS = 1.0
# Pause before re-subscribing to users-changed after the subscription failed (the cache is bypassed meanwhile).
RESUBSCRIBE_SECONDS = 1.0


# KEYS: features, history and seen key of each user in turn; ARGV[1]: history length. Scripts speak RESP2 to
# Redis, so HGETALL comes back as a flat [field, value, ...] array.
_GET_USERS_LUA = """
local out = {}
local last = tonumber(ARGV[1]) - 1
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('LRANGE', KEYS[i + 1], 0, last)
  out[#out + 1] = redis.call('SMEMBERS', KEYS[i + 2])
end
return out
"""

# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class StoredUser:
    """What Redis holds for one user: raw features, history (item ids, newest first, capped) and every item seen,
    plus `revision`, a digest of that content as read (equal revisions: the same record)."""

    features: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    seen: frozenset[str] = frozenset()
    revision: str = ""


def _revision(flat_features: Sequence[str], history: Sequence[str], seen: Sequence[str]) -> str:
    """Digest of a record's content as Redis returned it. Two reads of an unchanged record give the same one;
    a set returned in another order only gives another revision (a miss for whoever caches by it, never a
    wrong hit)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (flat_features, history, seen):
        digest.update("\x1f".join(part).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreHealth:
    status: Literal["ok", "degraded"]
    backend: Literal["embedded", "external"]
    error: str | None = None


def _json_value(value: Any) -> str | None:
    """JSON text of one raw feature value, or None for a missing one (NaN, None, empty list)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray | list | tuple):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        return json.dumps([str(v) for v in items if v is not None]) if items else None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return json.dumps(value)


def _decode_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # written by something else as a plain string


class FeatureStore:
    """User features and histories in Redis, through one asyncio client; see the module docstring for keys.

    Lifecycle: `await start()` (starts the embedded server when no URL is given; never fails because Redis is
    down: the store starts degraded and recovers) -> calls -> `await close()`."""

    def __init__(
        self,
        url: str | None,
        *,
        data_dir: Path,
        prefix: str = DEFAULT_PREFIX,
        max_history: int = 200,
        timeout: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        cache_seconds: float = 0.0,
        cache_size: int = 10_000,
    ) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.url = url
        self.keys = RedisKeys(prefix)
        self.max_history = max_history
        self.timeout = timeout
        self.embedded = EmbeddedRedis(Path(data_dir) / "redis") if url is None else None
        self._on_error = on_error
        self._client: aioredis.Redis | None = None
        self._get_users_script: AsyncScript | None = None
        self._health = StoreHealth("degraded", self.backend, NOT_STARTED)
        self._retry_at = 0.0
        self.cache: UserCache[StoredUser] = UserCache(cache_seconds, cache_size)
        self._follower: asyncio.Task[None] | None = None

    # ---- lifecycle and health

    @property
    def backend(self) -> Literal["embedded", "external"]:
        return "embedded" if self.embedded is not None else "external"

    @property
    def health(self) -> StoreHealth:
        return self._health

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("FeatureStore is not started; call `await store.start()` first")
        return self._client

    async def start(self) -> None:
        if self._client is not None:
            return
        url = self.url
        if self.embedded is not None:
            import anyio

            url = await anyio.to_thread.run_sync(self.embedded.start)
        assert url is not None
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One quick retry covers a pooled connection that died with a Redis restart; more would only make
            # every request wait while Redis is really down.
            retry=Retry(ConstantBackoff(0.01), 1),
        )
        await self.ping()
        if self.cache.enabled:
            self._follower = asyncio.create_task(self._follow_changes(), name="twotower-users-changed")

    async def close(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        client, self._client = self._client, None
        self._get_users_script = None
        if client is not None:
            await client.aclose()
        if self.embedded is not None:
            import anyio

            await anyio.to_thread.run_sync(self.embedded.stop)
        self._health = StoreHealth("degraded", self.backend, "closed")

    @contextlib.asynccontextmanager
    async def _call(self, operation: str, *, probe: bool = False) -> AsyncIterator[None]:
        """Run one Redis operation: record health, count failures, raise StoreUnavailableError on failure.

        After a failure, calls fail fast for `OUTAGE_BACKOFF_SECONDS` instead of each waiting out a connect
        timeout against a Redis that is gone; a `probe` (ping, as /readyz does) always tries for real."""
        if not probe and self._health.status == "degraded" and time.monotonic() < self._retry_at:
            if self._on_error is not None:
                self._on_error(operation)
            raise StoreUnavailableError(f"Redis is unreachable ({operation} not attempted: {self._health.error})")
        try:
            yield
        except (RedisError, OSError) as e:
            if self._health.status == "ok":
                log.warning("Redis unreachable during %s: %s", operation, e)
            self._health = StoreHealth("degraded", self.backend, f"{type(e).__name__}: {e}")
            self._retry_at = time.monotonic() + OUTAGE_BACKOFF_SECONDS
            if self._on_error is not None:
                self._on_error(operation)
            raise StoreUnavailableError(f"Redis is unreachable ({operation} failed: {e})") from e
        if self._health.status != "ok" and self._health.error != NOT_STARTED:
            log.info("Redis reachable again")
        self._health = StoreHealth("ok", self.backend)

    async def ping(self) -> bool:
        """Check Redis now; updates `health`. Never raises."""
        try:
            async with self._call("ping", probe=True):
                await self.client.ping()
        except StoreUnavailableError:
            return False
        return True

    # ---- reads

    async def get_users(self, user_ids: Sequence[str]) -> dict[str, StoredUser]:
        """Stored features, history and seen items of each user; users without data are absent. Served from the
        cache where it holds the user, otherwise read from Redis (and cached)."""
        found, missing = self.cache.lookup(list(dict.fromkeys(user_ids)))
        if not missing:
            return found
        with self.cache.reading() as keep:
            read = await self._read_users(missing)
            keep({user_id: read.get(user_id) for user_id in missing})
        return {**found, **read} if found else read

    async def _read_users(self, unique: Sequence[str]) -> dict[str, StoredUser]:
        """Read `unique` users from Redis in ONE command (a server-side script doing HGETALL + LRANGE + SMEMBERS
        per user). One command instead of a pipeline per user: the client-side cost per command (not Redis) was
        most of a request's Redis time, see docs/performance.md."""
        keys = [
            key
            for user_id in unique
            for key in (self.keys.user_features(user_id), self.keys.user_history(user_id), self.keys.user_seen(user_id))
        ]
        async with self._call("get_users"):
            if self._get_users_script is None:
                self._get_users_script = self.client.register_script(_GET_USERS_LUA)
            replies = await self._get_users_script(keys=keys, args=[self.max_history])
        out: dict[str, StoredUser] = {}
        for i, user_id in enumerate(unique):
            flat, history, seen = replies[3 * i : 3 * i + 3]  # HGETALL as [field, value, ...] inside a script
            if flat or history or seen:
                features = {flat[j]: _decode_value(flat[j + 1]) for j in range(0, len(flat), 2)}
                out[user_id] = StoredUser(features, list(history), frozenset(seen), _revision(flat, history, seen))
        return out

    # ---- writes

    async def record_events(self, events: Sequence[tuple[str, str]]) -> int:
        """Append (user_id, item_id) interactions, oldest first, to the users' histories in ONE transaction.

        Each item moves to the front of its user's history (an item is kept once, at its latest position), every
        touched history is trimmed to `max_history`, and the item joins the user's uncapped seen set. Returns the
        number written; raises
        StoreUnavailableError (and nothing is written) if Redis fails."""
        if not events:
            return 0
        users = list(dict.fromkeys(u for u, _ in events))
        try:
            async with self._call("record_events"):
                pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: all events or none
                for user_id, item_id in events:
                    key = self.keys.user_history(user_id)
                    pipe.lrem(key, 0, item_id)
                    pipe.lpush(key, item_id)
                    pipe.sadd(self.keys.user_seen(user_id), item_id)
                for user_id in users:
                    pipe.ltrim(self.keys.user_history(user_id), 0, self.max_history - 1)
                pipe.publish(self.keys.users_changed, json.dumps(users))  # delivered at EXEC, with the writes
                await pipe.execute()
        finally:  # even when the outcome is unknown (a reply lost after EXEC), the cached copies may be stale
            self.cache.invalidate(users)
        return len(events)

    async def load_users(
        self,
        users: pd.DataFrame,
        *,
        chunk: int = 1000,
        on_progress: Callable[[int], object] | None = None,
    ) -> int:
        """Bulk-write a users table (user_id index, raw feature columns, `history` = item ids newest first),
        replacing what each user had, pipelined `chunk` users per round trip: the history capped to `max_history`,
        every item in the seen set. Returns the users written."""
        feature_columns = [c for c in users.columns if c != "history"]
        histories: Iterable[Any] = users["history"] if "history" in users.columns else [None] * len(users)
        rows = zip(users.index, users[feature_columns].itertuples(index=False, name=None), histories, strict=True)
        written = 0
        batch: list[tuple[str, dict[str, str], list[str]]] = []  # (user, features, full history)

        async def flush() -> None:
            nonlocal written
            users = [user_id for user_id, _, _ in batch]
            async with self._call("load_users"):
                pipe = self.client.pipeline(transaction=False)
                for user_id, features, history in batch:
                    pipe.delete(
                        self.keys.user_features(user_id), self.keys.user_history(user_id), self.keys.user_seen(user_id)
                    )
                    if features:
                        mapping: dict[Any, Any] = features  # redis-py's stubs want a wider key type
                        pipe.hset(self.keys.user_features(user_id), mapping=mapping)
                    if history:
                        pipe.rpush(self.keys.user_history(user_id), *history[: self.max_history])
                        pipe.sadd(self.keys.user_seen(user_id), *history)
                pipe.publish(self.keys.users_changed, json.dumps(users))  # after this chunk's writes, same connection
                await pipe.execute()
            self.cache.invalidate(users)
            written += len(batch)
            if on_progress is not None:
                on_progress(len(batch))
            batch.clear()

        for user_id, values, history in rows:
            features = {name: text for name, v in zip(feature_columns, values, strict=True) if (text := _json_value(v))}
            items = [str(i) for i in (history if history is not None else [])]
            batch.append((str(user_id), features, items))
            if len(batch) >= chunk:
                await flush()
        if batch:
            await flush()
        return written

    # ---- notifications

    def pubsub(self) -> PubSub:
        return self.client.pubsub(ignore_subscribe_messages=True)

    async def _follow_changes(self) -> None:
        """Evict the users each `users_changed` message names. The cache serves only between the confirmation
        of the SUBSCRIBE (reads sent after it are ordered after it in Redis) and the first failure; then it is
        emptied and bypassed until a new subscription is confirmed."""
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.keys.users_changed)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.cache.set_live(True)
                        log.info("user cache live (%.0f s, %d users at most)", self.cache.ttl, self.cache.max_entries)
                    elif message["type"] == "message":
                        try:
                            self.cache.invalidate(_user_ids(message["data"]))
                        except ValueError as e:  # not ours to read: forget everything rather than guess
                            log.warning("unreadable users_changed message (%s); user cache emptied", e)
                            self.cache.clear()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down: never serve what may have been missed meanwhile
                if self.cache.live:
                    log.warning("user cache off until users_changed is followed again (%s: %s)", type(e).__name__, e)
            finally:
                self.cache.set_live(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_SECONDS)


def _user_ids(data: Any) -> list[str]:
    ids = json.loads(data)
    if not isinstance(ids, list):
        raise ValueError(f"users_changed carries a JSON list of user ids, got {type(ids).__name__}")
    return [str(user_id) for user_id in ids]
