"""Keeps the served (model, index) pair current: loads at start-up, swaps when the re-index job publishes, and
carries out the admin reload/pin. Plain asyncio around the `Retriever`; `service.app` starts and stops it.

Two ways to learn of a new index, so that neither is a single point of failure:
- Redis pub/sub: the re-index job PUBLISHes the new version on the index-published channel (instant);
- polling: the ACTIVE_INDEX pointer file is read every `poll_seconds` (covers a Redis outage, a lost message,
  or a job run without Redis).

Loads run in a worker thread (they read files and run the towers), one at a time. A load that fails is logged,
counted in `twotower_swaps_total{result="failed"}`, and remembered with a fingerprint of its files (names, sizes,
modification times of the index's and its model's), so the poller does not retry the same broken version every
tick, but does as soon as those files change (repaired, or written at last), and at the latest after
`RETRY_REFUSED_SECONDS`; the previous pair keeps serving meanwhile. A pin (admin) holds a version until the next
admin reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio

from service.errors import LoadRefusedError, NotReadyError, UnknownVersionError
from service.metrics import Metrics
from service.pair import ServingPair
from service.retriever import Retriever
from service.store import FeatureStore
from training.artifacts import MANIFEST, ArtifactError, check_version

log = logging.getLogger(__name__)

PUBSUB_RECONNECT_SECONDS = 1.0
# A refused version whose files have not changed is tried again after this long anyway.
RETRY_REFUSED_SECONDS = 60.0


@dataclass(frozen=True)
class SwapResult:
    model_version: str
    index_version: str
    changed: bool
    pinned: str | None


class IndexWatcher:
    """Loads and swaps pairs on start-up, on pub/sub notifications, on pointer changes and on admin calls."""

    def __init__(self, retriever: Retriever, store: FeatureStore, metrics: Metrics, poll_seconds: float) -> None:
        self.retriever = retriever
        self.store = store
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.pinned: str | None = None
        self.last_error: str | None = None
        self._failed: tuple[str, tuple[Any, ...], float] | None = None  # (version, fingerprint, when)
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle

    async def start(self) -> None:
        """Load the active pair (a failure leaves the service unready, not dead), then start watching."""
        try:
            await self.swap_to(None, reason="start-up")
        except (LoadRefusedError, NotReadyError) as e:
            log.warning("not ready at start-up: %s", e)
        self._tasks.append(asyncio.create_task(self._listen(), name="twotower-pubsub"))
        if self.poll_seconds > 0:
            self._tasks.append(asyncio.create_task(self._poll(), name="twotower-poll"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # ---- swaps

    async def swap_to(self, index_version: str | None, *, reason: str, force: bool = False) -> SwapResult:
        """Load `index_version` (None: the ACTIVE_INDEX pointer) unless it is already serving; swap on success.

        Raises NotReadyError when nothing is published and LoadRefusedError when the pair is refused (the
        previous pair keeps serving). Without `force`, a version that already failed is not retried."""
        async with self._lock:
            current = self.retriever.current
            target = index_version or self.retriever.artifacts.active_index()
            if target is None:
                raise NotReadyError(
                    f"no active index under {self.retriever.artifacts.root}: run `twotower reindex` to publish one"
                )
            if current is not None and current.index_version == target and not force:
                return self._result(current, changed=False)
            if self._still_refused(target) and not force:
                raise LoadRefusedError(f"index {target} was refused before: {self.last_error}")
            try:
                pair = await anyio.to_thread.run_sync(self.retriever.load, target)
            except Exception as e:  # whatever goes wrong in a load, the service and its current pair live on
                if not isinstance(e, ArtifactError | OSError | ValueError):
                    log.exception("unexpected error loading index %s", target)
                self.metrics.swaps.labels("failed").inc()
                self._failed, self.last_error = (target, self._fingerprint(target), time.monotonic()), str(e)
                serving = f"still serving index {current.index_version}" if current else "nothing is serving yet"
                log.error("refused index %s (%s): %s; %s", target, reason, e, serving)
                raise LoadRefusedError(f"index {target} refused: {e}; {serving}") from e
            self.metrics.swaps.labels("ok").inc()
            self.metrics.set_active(pair.model_version, pair.index_version, len(pair.index))
            self._failed, self.last_error = None, None
            changed = current is None or current.index_version != pair.index_version
            log.info("swapped to index %s / model %s (%s)", pair.index_version, pair.model_version, reason)
            return self._result(pair, changed=changed)

    async def reload(self) -> SwapResult:
        """Admin: drop any pin and load the ACTIVE_INDEX pointer's version (again, even if it is serving)."""
        self.pinned = None
        return await self.swap_to(None, reason="admin reload", force=True)

    async def pin(self, index_version: str) -> SwapResult:
        """Admin: serve `index_version` and ignore pointer changes until the next reload."""
        try:
            check_version(index_version, "index version")
        except ArtifactError as e:
            raise LoadRefusedError(str(e)) from e
        if not (self.retriever.artifacts.index_dir(index_version) / MANIFEST).is_file():
            raise UnknownVersionError(f"no index {index_version} in {self.retriever.artifacts.root}")
        result = await self.swap_to(index_version, reason="admin pin", force=True)
        self.pinned = index_version
        return SwapResult(result.model_version, result.index_version, result.changed, self.pinned)

    def _fingerprint(self, version: str) -> tuple[Any, ...]:
        """(name, size, mtime) of every file of the index and of the model its manifest names; a repair or a late
        write changes it."""
        store = self.retriever.artifacts
        directories = [store.index_dir(version)]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            manifest = json.loads((directories[0] / MANIFEST).read_text())
            directories.append(store.model_dir(check_version(str(manifest["model_version"]))))
        stats = []
        for directory in directories:
            with contextlib.suppress(OSError):
                for path in sorted(directory.iterdir()):
                    info = path.stat()
                    stats.append((str(path), info.st_size, info.st_mtime_ns))
        return tuple(stats)

    def _still_refused(self, version: str) -> bool:
        """Whether `version` was refused and nothing about it changed since (nor has the retry time come)."""
        if self._failed is None or self._failed[0] != version:
            return False
        _, fingerprint, when = self._failed
        return time.monotonic() - when < RETRY_REFUSED_SECONDS and self._fingerprint(version) == fingerprint

    def _result(self, pair: ServingPair, *, changed: bool) -> SwapResult:
        return SwapResult(pair.model_version, pair.index_version, changed, self.pinned)

    async def _notify(self, version: str | None, reason: str) -> None:
        """A new version was announced: load it unless pinned, already serving, or already refused."""
        if self.pinned is not None:
            if version and version != self.pinned:
                log.info("index %s announced (%s) but %s is pinned; ignoring", version, reason, self.pinned)
            return
        if version is None or self._still_refused(version):
            return
        current = self.retriever.current
        if current is not None and current.index_version == version:
            return
        with contextlib.suppress(LoadRefusedError, NotReadyError):  # logged and counted in swap_to
            await self.swap_to(version, reason=reason)

    # ---- watchers

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                version = self.retriever.artifacts.active_index()
            except OSError as e:
                log.warning("cannot read the ACTIVE_INDEX pointer: %s", e)
                continue
            await self._notify(version, "ACTIVE_INDEX changed")

    async def _listen(self) -> None:
        """Follow the index-published channel; on any Redis failure, reconnect after a pause (polling covers gaps)."""
        while True:
            pubsub = None
            try:
                pubsub = self.store.pubsub()
                await pubsub.subscribe(self.store.keys.index_published)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self._notify(str(message["data"]).strip(), "published on Redis")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure here (Redis down, a bad message) must not end the listener
                log.debug("index notifications unavailable (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(PUBSUB_RECONNECT_SECONDS)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
