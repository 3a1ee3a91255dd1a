"""`service.watcher.IndexWatcher` on its own (no HTTP): it loads the active pair at start, follows the Redis
notification and the pointer file, remembers a refused version instead of retrying it every tick, and holds a pin
until the next reload. Real retriever, real store on a real Redis, real artifacts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.errors import LoadRefusedError, NotReadyError
from service.metrics import Metrics
from service.retriever import Retriever
from service.store import FeatureStore
from service.watcher import IndexWatcher
from tests.helpers import copy_model, publish_index
from training.artifacts import ArtifactStore, LoadedModel


async def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return False


def run_watched(
    root: Path, redis_url: str, prefix: str, poll_seconds: float, body: Callable[[IndexWatcher], Awaitable[None]]
) -> None:
    async def go() -> None:
        retriever = Retriever(root)
        store = FeatureStore(redis_url, data_dir=root / "data", prefix=prefix)
        await store.start()
        watcher = IndexWatcher(retriever, store, Metrics(), poll_seconds)
        try:
            await watcher.start()
            await body(watcher)
        finally:
            await watcher.stop()
            await store.close()

    asyncio.run(go())


def test_start_without_an_index_is_not_ready_then_a_publication_is_followed(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_version = copy_model(trained_model, tmp_path)

    async def body(watcher: IndexWatcher) -> None:
        assert watcher.retriever.current is None
        with pytest.raises(NotReadyError):
            await watcher.swap_to(None, reason="test")
        version = publish_index(tmp_path, model_version)  # moves the pointer; polling is off: Redis must tell
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.publish(watcher.store.keys.index_published, version)
        finally:
            await client.aclose()
        assert await eventually(lambda: watcher.retriever.current is not None)
        current = watcher.retriever.current
        assert current is not None and current.index_version == version

    run_watched(tmp_path, redis_url, "watch-pub:", 0, body)


def test_a_refused_version_is_remembered_and_the_serving_pair_stays(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_version = copy_model(trained_model, tmp_path)
    good = publish_index(tmp_path, model_version)
    store = ArtifactStore(tmp_path)

    async def body(watcher: IndexWatcher) -> None:
        assert watcher.retriever.current is not None
        broken = publish_index(tmp_path, model_version, activate=False)
        (store.index_dir(broken) / "item_ids.json").write_text("[]\n")
        store.set_active_index(broken)  # the poller finds it
        assert await eventually(lambda: watcher.last_error is not None)
        assert broken in watcher.last_error and "corrupted" in watcher.last_error
        current = watcher.retriever.current
        assert current is not None and current.index_version == good
        with pytest.raises(LoadRefusedError, match="refused before"):
            await watcher.swap_to(broken, reason="test")  # not retried without force
        with pytest.raises(LoadRefusedError, match="corrupted"):
            await watcher.swap_to(broken, reason="test", force=True)

    run_watched(tmp_path, redis_url, "watch-bad:", 0.05, body)


def test_a_refused_version_is_loaded_once_its_files_are_repaired(
    trained_model: LoadedModel, tmp_path: Path, redis_url: str
) -> None:
    model_version = copy_model(trained_model, tmp_path)
    publish_index(tmp_path, model_version)
    store = ArtifactStore(tmp_path)

    async def body(watcher: IndexWatcher) -> None:
        broken = publish_index(tmp_path, model_version, activate=False)
        ids_file = store.index_dir(broken) / "item_ids.json"
        good_ids = ids_file.read_text()
        ids_file.write_text("[]\n")
        store.set_active_index(broken)
        assert await eventually(lambda: watcher.last_error is not None)
        ids_file.write_text(good_ids)  # repaired in place: same version, same pointer, no announcement
        assert await eventually(lambda: getattr(watcher.retriever.current, "index_version", None) == broken)
        assert watcher.last_error is None

    run_watched(tmp_path, redis_url, "watch-fix:", 0.05, body)


def test_a_pin_holds_until_reload(trained_model: LoadedModel, tmp_path: Path, redis_url: str) -> None:
    model_version = copy_model(trained_model, tmp_path)
    first = publish_index(tmp_path, model_version)

    async def body(watcher: IndexWatcher) -> None:
        pinned = await watcher.pin(first)
        assert pinned.pinned == first and watcher.pinned == first
        newer = publish_index(tmp_path, model_version)
        await asyncio.sleep(0.3)  # several poll periods
        current = watcher.retriever.current
        assert current is not None and current.index_version == first
        with pytest.raises(LoadRefusedError, match="not a valid artifact version name"):
            await watcher.pin("../escape")
        reloaded = await watcher.reload()
        assert (reloaded.index_version, reloaded.pinned, reloaded.changed) == (newer, None, True)

    run_watched(tmp_path, redis_url, "watch-pin:", 0.05, body)
