"""The names of every Redis key and channel the project uses, under one prefix: the online-state contract.

Imported by everything that talks to Redis, on both sides: the service's store (reads per request, writes per
event) and index watcher, `twotower load-features`, and the re-index job's publish notification. Nobody else
spells a key.

    {prefix}user:{user_id}:features   hash    feature name -> JSON-encoded raw value
    {prefix}user:{user_id}:history    list    item ids, newest first, each at most once, capped: the tower's input
    {prefix}user:{user_id}:seen       zset    the user's latest item ids (capped; score: when last seen): what
                                              exclude_seen leaves out
    {prefix}events                    stream  every accepted event (user_id, item_id, timestamp), appended in the
                                              script that acknowledges it; read and trimmed by `twotower
                                              export-events`
    {prefix}events:added              string  how many events were ever appended to the log (same script): the
                                              export counts what the log's bound dropped unexported against it
    {prefix}call:{call_id}            string  marks an event call as applied for a minute: a call redelivered
                                              after a dropped connection is not applied twice
    {prefix}active_index              string  the published index version (set by the re-index job, for operators)
    {prefix}index_published           channel the re-index job PUBLISHes each new index version here
    {prefix}users_changed             channel every write of user keys PUBLISHes the JSON list of user ids it
                                              touched, in the same transaction: caches evict those users
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "twotower:"
# Seen items kept per user, and events the log keeps, unless configured otherwise (service.settings).
DEFAULT_MAX_SEEN = 2000
DEFAULT_EVENT_LOG_MAX = 10_000_000


@dataclass(frozen=True)
class RedisKeys:
    """Key and channel names under `prefix` (several deployments can share one Redis with distinct prefixes)."""

    prefix: str = DEFAULT_PREFIX

    def user_features(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:features"

    def user_history(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:history"

    def user_seen(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}:seen"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def events_added(self) -> str:
        return f"{self.prefix}events:added"

    def call(self, call_id: str) -> str:
        return f"{self.prefix}call:{call_id}"

    @property
    def active_index(self) -> str:
        return f"{self.prefix}active_index"

    @property
    def index_published(self) -> str:
        return f"{self.prefix}index_published"

    @property
    def users_changed(self) -> str:
        return f"{self.prefix}users_changed"
