"""`UserCache`: this process's copy of recently read users, kept correct by invalidation, with expiry as a backstop.

Why: a known user's Redis read (one round trip, a script, the reply parsed) is the largest cost of a
recommendation after the framework itself (docs/performance.md), and most requests are for users read moments ago.

How it stays correct (the store, `service.store.FeatureStore`, drives it):
- every write the store makes (events, load-features) PUBLISHes the touched user ids on the users-changed channel
  in the same MULTI as the write, and every service process evicts them when the message arrives; the writing
  process evicts them itself as soon as its write returns, so a client reads its own writes at once;
- the cache is used only while that subscription is confirmed (`live`); when it drops, the cache is emptied and
  bypassed (every read goes to Redis) until the subscription is back;
- a read that was in flight when one of its users was invalidated (or the cache emptied) is returned to its
  caller but not stored: it may hold the data from before the write;
- entries expire after `ttl` seconds, which bounds how stale a user can be when something writes Redis without
  going through the store (and so without publishing).

A user Redis holds nothing for is cached too (as absent): cold users with an id cost no round trip either.
Plain data structure, one event loop: no locks, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

V = TypeVar("V")

# Invalidations remembered for in-flight reads are dropped whenever no read is in flight; if reads overlap
# without pause for this many invalidated users, the whole cache is emptied instead (correct, just colder).
MAX_TOUCHED = 100_000


class UserCache(Generic[V]):
    """user id -> value (or absent), see the module docstring. `ttl <= 0` or `max_entries <= 0` disables it."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[float, V | None]] = {}  # user -> (expires at, value or None = absent)
        self._live = False
        self._epoch = 0  # bumped when the cache is emptied: reads begun before store nothing
        self._tick = 0  # bumped by every invalidation
        self._touched: dict[str, int] = {}  # user -> tick of its last invalidation, while reads are in flight
        self._in_flight = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0

    @property
    def live(self) -> bool:
        """Serving from the cache: enabled and the invalidation subscription confirmed."""
        return self._live

    def __len__(self) -> int:
        return len(self._entries)

    def set_live(self, live: bool) -> None:
        """The subscription came up (True) or went down (False); either way what is cached may have missed
        invalidations, so it is dropped."""
        self.clear()
        self._live = live and self.enabled

    def lookup(self, user_ids: Sequence[str]) -> tuple[dict[str, V], list[str]]:
        """(cached values of present users, users to read from Redis); users cached as absent are in neither."""
        if not self._live:
            return {}, list(user_ids)
        now = self.clock()
        found: dict[str, V] = {}
        missing: list[str] = []
        for user_id in user_ids:
            entry = self._entries.get(user_id)
            if entry is None or entry[0] <= now:
                missing.append(user_id)
            elif entry[1] is not None:
                found[user_id] = entry[1]
        self.misses += len(missing)
        self.hits += len(user_ids) - len(missing)
        return found, missing

    @contextmanager
    def reading(self) -> Iterator[Callable[[Mapping[str, V | None]], None]]:
        """Wrap one Redis read: yields `keep(values)`, which stores the read's values (None = absent) unless an
        invalidation or a clear happened since the read began."""
        epoch, tick = self._epoch, self._tick
        self._in_flight += 1

        def keep(values: Mapping[str, V | None]) -> None:
            if not self._live or epoch != self._epoch:
                return
            expires = self.clock() + self.ttl
            for user_id, value in values.items():
                if self._touched.get(user_id, -1) > tick:
                    continue  # written while this read was in flight: its value may predate the write
                if user_id not in self._entries and len(self._entries) >= self.max_entries:
                    del self._entries[next(iter(self._entries))]  # the oldest entry
                self._entries[user_id] = (expires, value)

        try:
            yield keep
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._touched.clear()

    def invalidate(self, user_ids: Iterable[str]) -> None:
        """These users changed in Redis: drop them, and keep in-flight reads from storing them."""
        self._tick += 1
        for user_id in user_ids:
            self._entries.pop(user_id, None)
            if self._in_flight:
                self._touched[user_id] = self._tick
        if len(self._touched) > MAX_TOUCHED:
            self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._touched.clear()
        self._epoch += 1
