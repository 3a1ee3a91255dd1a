"""Online state in Redis: users' features, recent histories and seen items, read per request and written per
event, and the event log (a Redis Stream) every accepted event is appended to, through ONE redis-py asyncio
client whether Redis is external (`TWOTOWER_REDIS_URL`) or the embedded server (`service.redis_server`) the store
starts, owns and stops. Key names are `training.redis_keys.RedisKeys`.

Used by the service (reads per request, writes per event) and by `twotower load-features` (bulk writes).

What one user costs per request is bounded: the history is capped to `max_history` items, the seen items to the
latest `max_seen` (older ones may be recommended again), so no user's stored state can grow what a request reads.

Events are written by ONE server-side script per call (`_RECORD_EVENTS_LUA`): the histories, the seen items, the
event log and the users-changed notice, all or nothing. The call carries a deadline on Redis's clock; a script that
starts after it writes nothing and fails, so a call the client gave up on (answered 503) is never applied later,
e.g. by a Redis that was frozen and resumes. A call id makes a redelivered call (redis-py reconnects and resends
after a dropped connection) a no-op. Timeouts are not retried: a frozen Redis costs a request one timeout.

Health: every call updates `health` (ok / degraded with the error). A failed call raises
`StoreUnavailableError` and nothing it wrote is acknowledged. After a failure, calls fail fast (no Redis call)
for a backoff that doubles with each failure in a row; a monitor task pings Redis in the background (every
second while ok, sooner while degraded) and its first success ends the outage, so the store recovers by itself
when Redis comes back, /readyz answers from `health` without waiting on Redis, and a Redis that freezes while no
request touches it is noticed within a second.

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
import uuid
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from service.errors import StoreUnavailableError
from service.redis_server import EmbeddedRedis
from service.user_cache import UserCache
from training.redis_keys import DEFAULT_EVENT_LOG_MAX, DEFAULT_MAX_SEEN, DEFAULT_PREFIX, RedisKeys

log = logging.getLogger(__name__)

NOT_STARTED = "not started"
# After a failed call, further calls fail fast (no Redis call) for this long, doubled with each failure in a row up
# to OUTAGE_BACKOFF_MAX_SECONDS, rather than each waiting out a timeout; the monitor's first good ping ends it.
OUTAGE_BACKOFF_SECONDS = 0.25
OUTAGE_BACKOFF_MAX_SECONDS = 4.0
# Background pings: while ok (a Redis that freezes with no traffic is noticed), and while degraded (recovery).
MONITOR_OK_SECONDS = 1.0
MONITOR_DEGRADED_SECONDS = 0.2
# Pause before re-subscribing to users-changed after the subscription failed (the cache is bypassed meanwhile).
RESUBSCRIBE_SECONDS = 1.0
# How long `close` waits for its tasks before cancelling them again.
CLOSE_RETRY_SECONDS = 0.5
# An event call must start on Redis within this share of the timeout; the rest is the reply's way back.
DEADLINE_SHARE = 0.8
# How long an applied call id is remembered (redelivery after a reconnect happens within a timeout).
CALL_ID_SECONDS = 60

# KEYS: features, history and seen key of each user in turn; ARGV[1]: history length, ARGV[2]: seen items.
# Scripts speak RESP2 to Redis, so HGETALL comes back as a flat [field, value, ...] array. A seen key that is
# still the plain set of earlier versions is read as a sample of its size (converted at the user's next event).
_GET_USERS_LUA = """
local out = {}
local last = tonumber(ARGV[1]) - 1
local seen_max = tonumber(ARGV[2])
for i = 1, #KEYS, 3 do
  out[#out + 1] = redis.call('HGETALL', KEYS[i])
  out[#out + 1] = redis.call('LRANGE', KEYS[i + 1], 0, last)
  local seen = redis.pcall('ZREVRANGE', KEYS[i + 2], 0, seen_max - 1)
  if seen['err'] then seen = redis.call('SRANDMEMBER', KEYS[i + 2], seen_max) end
  out[#out + 1] = seen
end
return out
"""

# KEYS[1]: the event log, KEYS[2]: its count of events ever appended, KEYS[3]: this call's id key, then history and
# seen key of each user in turn.
# ARGV: deadline (ms, Redis clock), max_history, max_seen, event log bound, users-changed channel, the users
# (JSON list, KEYS order), then (user's 1-based position, item id, timestamp or "") per event, oldest first.
# Every check comes before the first write: a script that fails midway would keep what it had written.
_RECORD_EVENTS_LUA = (
    """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if now_ms > tonumber(ARGV[1]) then
  return redis.error_reply('DEADLINE the call reached Redis after its deadline; nothing was written')
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
local function kind(key) return redis.call('TYPE', key)['ok'] end
local expected = {list = true, zset = true, set = true, none = true}
for i = 4, #KEYS do
  if not expected[kind(KEYS[i])] then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. kind(KEYS[i]) .. '; nothing was written')
  end
end
local log_kind = kind(KEYS[1])
if log_kind ~= 'stream' and log_kind ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. log_kind .. '; nothing was written')
end
for i = 5, #KEYS, 2 do
  if kind(KEYS[i]) == 'set' then
    local members = redis.call('SMEMBERS', KEYS[i])
    redis.call('DEL', KEYS[i])
    for j = 1, #members do redis.call('ZADD', KEYS[i], 0, members[j]) end
  end
end
local users = cjson.decode(ARGV[6])
local max_history, max_seen = tonumber(ARGV[2]), tonumber(ARGV[3])
local n = 0
for j = 7, #ARGV, 3 do
  local u = tonumber(ARGV[j])
  local history, seen = KEYS[2 + 2 * u], KEYS[3 + 2 * u]
  local item, stamp = ARGV[j + 1], ARGV[j + 2]
  if stamp == '' then stamp = string.format('%.3f', now_ms / 1000) end
  redis.call('LREM', history, 0, item)
  redis.call('LPUSH', history, item)
  redis.call('ZADD', seen, string.format('%.0f', now_ms * 1000 + n), item)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'user_id', users[u], 'item_id', item, 'timestamp', stamp)
  n = n + 1
end
for u = 1, #users do
  redis.call('LTRIM', KEYS[2 + 2 * u], 0, max_history - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[3 + 2 * u], 0, -(max_seen + 1))
end
redis.call('INCRBY', KEYS[2], n)
redis.call('PUBLISH', ARGV[5], ARGV[6])
redis.call('SET', KEYS[3], '1', 'EX', """
    + str(CALL_ID_SECONDS)
    + """)
return n
"""
)

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
        max_seen: int = DEFAULT_MAX_SEEN,
        event_log_max: int = DEFAULT_EVENT_LOG_MAX,
        timeout: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        cache_seconds: float = 0.0,
        cache_size: int = 10_000,
    ) -> None:
        if max_history < 1 or max_seen < 1 or event_log_max < 1:
            raise ValueError(
                f"max_history, max_seen, event_log_max must be >= 1: {max_history}, {max_seen}, {event_log_max}"
            )
        self.url = url
        self.keys = RedisKeys(prefix)
        self.max_history = max_history
        self.max_seen = max_seen
        self.event_log_max = event_log_max
        self.timeout = timeout
        self.embedded = EmbeddedRedis(Path(data_dir) / "redis") if url is None else None
        self._on_error = on_error
        self._client: aioredis.Redis | None = None
        self._get_users_script: AsyncScript | None = None
        self._record_events_script: AsyncScript | None = None
        self._health = StoreHealth("degraded", self.backend, NOT_STARTED)
        self._retry_at = 0.0
        self._failures = 0  # calls failed in a row
        self._clock_offset = 0.0  # Redis's clock minus ours (seconds), measured by each ping
        self.cache: UserCache[StoredUser] = UserCache(cache_seconds, cache_size)
        self._tasks: list[asyncio.Task[None]] = []

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
            # One quick retry on a dropped connection covers a pooled connection that died with a Redis restart.
            # None on a timeout: a frozen Redis would make every request wait twice.
            retry=Retry(ConstantBackoff(0.01), 1, supported_errors=(RedisConnectionError,)),
        )
        await self.ping()
        self._tasks.append(asyncio.create_task(self._monitor(), name="twotower-store-monitor"))
        if self.cache.enabled:
            self._tasks.append(asyncio.create_task(self._follow_changes(), name="twotower-users-changed"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        pending = set(tasks)
        while pending:
            # Cancelled again until done: on Python 3.11 a cancel that meets an expiring `asyncio.timeout` (as in
            # redis-py's `get_message(timeout=...)`) can be lost, and the task would run on, holding close forever.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CLOSE_RETRY_SECONDS)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        client, self._client = self._client, None
        self._get_users_script = self._record_events_script = None
        if client is not None:
            await client.aclose()
        if self.embedded is not None:
            import anyio

            await anyio.to_thread.run_sync(self.embedded.stop)
        self._health = StoreHealth("degraded", self.backend, "closed")

    @contextlib.asynccontextmanager
    async def _call(self, operation: str, *, probe: bool = False) -> AsyncIterator[None]:
        """Run one Redis operation: record health, count failures, raise StoreUnavailableError on failure.

        After a failure, calls fail fast for a backoff (doubling with each failure in a row) instead of each
        waiting out a timeout against a Redis that is gone or frozen; a `probe` (the monitor's ping) always tries
        for real, and its success ends the backoff."""
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
            backoff = min(OUTAGE_BACKOFF_SECONDS * 2**self._failures, OUTAGE_BACKOFF_MAX_SECONDS)
            self._failures += 1
            self._retry_at = time.monotonic() + backoff
            if self._on_error is not None:
                self._on_error(operation)
            raise StoreUnavailableError(f"Redis is unreachable ({operation} failed: {e})") from e
        if self._health.status != "ok" and self._health.error != NOT_STARTED:
            log.info("Redis reachable again")
        self._health = StoreHealth("ok", self.backend)
        self._failures, self._retry_at = 0, 0.0

    async def ping(self) -> bool:
        """Check Redis now (and measure its clock against ours, for event deadlines); updates `health`. Never
        raises."""
        try:
            async with self._call("ping", probe=True):
                sent = time.time()
                seconds, micros = await self.client.time()
                received = time.time()
        except StoreUnavailableError:
            return False
        self._clock_offset = seconds + micros / 1e6 - (sent + received) / 2
        return True

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_OK_SECONDS if self._health.status == "ok" else MONITOR_DEGRADED_SECONDS)
            await self.ping()

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
            replies = await self._get_users_script(keys=keys, args=[self.max_history, self.max_seen])
        out: dict[str, StoredUser] = {}
        for i, user_id in enumerate(unique):
            flat, history, seen = replies[3 * i : 3 * i + 3]  # HGETALL as [field, value, ...] inside a script
            if flat or history or seen:
                features = {flat[j]: _decode_value(flat[j + 1]) for j in range(0, len(flat), 2)}
                out[user_id] = StoredUser(features, list(history), frozenset(seen), _revision(flat, history, seen))
        return out

    # ---- writes

    async def record_events(self, events: Sequence[tuple[str, str] | tuple[str, str, float | None]]) -> int:
        """Apply (user_id, item_id[, timestamp]) interactions, oldest first, and append them to the event log, in
        ONE script (see the module docstring): all or nothing.

        Each item moves to the front of its user's history (an item is kept once, at its latest position), every
        touched history is trimmed to `max_history`, the item joins the user's seen items (the latest `max_seen`
        kept), and the event goes to the log with its timestamp (Redis's clock when none). Returns the number
        written; raises StoreUnavailableError, and nothing is written, if Redis fails or the call reaches it after
        its deadline."""
        if not events:
            return 0
        users = list(dict.fromkeys(e[0] for e in events))
        position = {user_id: i + 1 for i, user_id in enumerate(users)}
        keys = [self.keys.events, self.keys.events_added, self.keys.call(uuid.uuid4().hex)]
        for user_id in users:
            keys += [self.keys.user_history(user_id), self.keys.user_seen(user_id)]
        # The deadline is on Redis's clock (our clock plus the offset the last ping measured).
        deadline = time.time() + self._clock_offset + DEADLINE_SHARE * self.timeout
        args: list[str | int] = [
            int(deadline * 1000),
            self.max_history,
            self.max_seen,
            self.event_log_max,
            self.keys.users_changed,
            json.dumps(users),
        ]
        for event in events:
            stamp = event[2] if len(event) > 2 else None
            args += [position[event[0]], event[1], "" if stamp is None else repr(float(stamp))]
        try:
            async with self._call("record_events"):
                if self._record_events_script is None:
                    self._record_events_script = self.client.register_script(_RECORD_EVENTS_LUA)
                # A late call is refused by the script (a ResponseError): an outage like a timeout, nothing written.
                await self._record_events_script(keys=keys, args=args)
        finally:  # even when the outcome is unknown (a reply lost), the cached copies may be stale
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
        the latest `max_seen` items as seen. Returns the users written."""
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
                        # scores count down from the newest (an item's first place wins), so trims keep the latest
                        recent = list(enumerate(history[: self.max_seen]))
                        pipe.zadd(self.keys.user_seen(user_id), {item: -i for i, item in reversed(recent)})
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
