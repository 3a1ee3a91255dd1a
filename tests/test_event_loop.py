"""The feedback loop: events the service acknowledged are exported exactly once (across repeats and a crash between
writing a partition and trimming the log), counted when the log's bound dropped them, and become training data:
new users and items join the vocabularies, a warm start carries the previous model's rows over, and `retrain`
publishes a model the running service can swap to, or refuses one that fails the gate."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis as redis_sync

from service.store import FeatureStore
from tests.helpers import TINY_CONFIG
from training import event_export
from training.artifacts import INDEX_ITEMS, ArtifactStore, LoadedModel, load_model
from training.cli import main as twotower
from training.dataset import Dataset, with_events
from training.event_export import export_events, read_events
from training.redis_keys import RedisKeys
from training.retrain import EVENTS_SEEN, held_out_rows, retrain
from training.train import train_and_save
from training.warm_start import warm_start


def _record(url: str, prefix: str, tmp: Path, events: Sequence[tuple[str, str, float]], **settings: int) -> None:
    async def go() -> None:
        store = FeatureStore(url, data_dir=tmp, prefix=prefix, **settings)  # type: ignore[arg-type]
        await store.start()
        try:
            for start in range(0, len(events), 50):
                await store.record_events(events[start : start + 50])
        finally:
            await store.close()

    asyncio.run(go())


def _events(n: int, first: int = 0) -> list[tuple[str, str, float]]:
    return [(f"u{i % 7}", f"item-{first + i}", 1_700_000_000.0 + first + i) for i in range(n)]


def test_every_acknowledged_event_is_exported_exactly_once(redis_url: str, tmp_path: Path) -> None:
    prefix, out = "exp-once:", tmp_path / "events"
    _record(redis_url, prefix, tmp_path, _events(120))
    first = export_events(redis_url, out, prefix, chunk=50)
    assert (first.exported, len(first.partitions), first.dropped, first.remaining) == (120, 3, 0, 0)
    again = export_events(redis_url, out, prefix)
    assert again.exported == 0 and again.partitions == []

    _record(redis_url, prefix, tmp_path, _events(30, first=120))
    # A run that wrote its partition and died before trimming the log: the next run neither repeats nor loses.
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    rows = client.xrange(RedisKeys(prefix).events, count=10)
    event_export._write_partition(out, rows)  # type: ignore[arg-type]
    assert client.xlen(RedisKeys(prefix).events) == 30
    resumed = export_events(redis_url, out, prefix)
    assert resumed.exported == 20 and client.xlen(RedisKeys(prefix).events) == 0
    client.close()

    events = read_events(out)
    assert len(events) == 150 == event_export.exported_count(out)
    assert list(events["item_id"]) == [f"item-{i}" for i in range(150)]  # in log order, each once
    assert events["timestamp"].iloc[0] == pytest.approx(1_700_000_000.0)
    assert pq.read_schema(next(out.glob("events-*.parquet"))).names == ["user_id", "item_id", "timestamp"]


def test_events_the_log_bound_dropped_before_an_export_are_counted(redis_url: str, tmp_path: Path) -> None:
    prefix = "exp-bound:"
    _record(redis_url, prefix, tmp_path, _events(1000), event_log_max=100)
    result = export_events(redis_url, tmp_path / "events", prefix)
    assert result.dropped > 0  # approximate trimming keeps at least the bound
    assert result.exported >= 100
    assert result.exported + result.dropped == 1000


def test_a_model_trained_on_exported_events_records_how_many_it_had(redis_url: str, tmp_path: Path) -> None:
    prefix, out, root = "train-events:", tmp_path / "events", tmp_path / "artifacts"
    _record(redis_url, prefix, tmp_path, [(f"u{i}", f"i{i % 7}", 1.7e9 + i) for i in range(30)])
    export_events(redis_url, out, prefix)
    data = ["--synthetic-users", "60", "--synthetic-items", "40", "--epochs", "2", "--artifacts", str(root)]
    assert twotower(["train", *data, "--events", str(out), "-q"]) == 0
    model = load_model(ArtifactStore(root).model_dir(ArtifactStore(root).active_model()))
    assert model.manifest["training"][EVENTS_SEEN] == 30  # so `retrain` treats only later events as new to it


def test_an_export_from_a_bad_since_id_is_refused(redis_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a stream id"):
        export_events(redis_url, tmp_path / "events", "exp-bad:", since="yesterday")


def _grown(dataset: Dataset) -> Dataset:
    base = dataset.interactions
    known_user, known_item = str(base.user_ids[0]), str(base.item_ids[0])
    later = float(base.timestamp.max()) + 1
    users = [known_user, "new-user", "new-user", known_user]
    items = ["new-item", "new-item", known_item, "new-item"]
    return with_events(dataset, users, items, [later, later + 1, later + 2, later + 3])


def test_events_grow_the_vocabularies_and_a_warm_start_keeps_what_the_old_model_knew(
    tiny_dataset: Dataset, trained_model: LoadedModel, tmp_path: Path
) -> None:
    grown = _grown(tiny_dataset)
    assert "new-item" in set(grown.items.index) and "new-user" in set(grown.users.index)
    assert len(grown.interactions) == len(tiny_dataset.interactions) + 3  # a repeated (user, item) keeps one row
    store = ArtifactStore(tmp_path / "artifacts")
    model_dir = train_and_save(grown, store, TINY_CONFIG, progress=False, warm_from=trained_model)
    new = load_model(model_dir)
    assert "new-item" in new.model.vocabs.item_ids and "new-user" in new.model.vocabs.user_ids
    assert new.manifest["training"]["warm_start_from"] == trained_model.version

    from training.model import TwoTower

    fresh = TwoTower(new.model.spec, new.model.vocabs, new.model.config)
    record = warm_start(fresh, trained_model.model, trained_model.version)
    assert record.rows_new >= 2  # new-user in the user ids, new-item in the item ids (twice: id and history)
    old_vocab, new_vocab = trained_model.model.vocabs.item_ids, fresh.vocabs.item_ids
    token = old_vocab.tokens[5]
    np.testing.assert_array_equal(
        fresh.item_tower.item_id.weight[new_vocab.lookup(token)].detach().numpy(),
        trained_model.model.item_tower.item_id.weight[old_vocab.lookup(token)].detach().numpy(),
    )


def test_a_warm_start_from_towers_of_another_shape_is_refused(
    tiny_dataset: Dataset, trained_model: LoadedModel
) -> None:
    import dataclasses

    from training.model import TwoTower

    other = TwoTower(
        tiny_dataset.spec, trained_model.model.vocabs, dataclasses.replace(trained_model.model.config, dim=8)
    )
    with pytest.raises(ValueError, match="configured differently"):
        warm_start(other, trained_model.model, trained_model.version)


def test_retrain_publishes_a_model_with_the_new_items_and_refuses_one_below_the_gate(
    tiny_dataset: Dataset, redis_url: str, tmp_path: Path
) -> None:
    prefix, root = "retrain:", tmp_path / "artifacts"
    store = ArtifactStore(root)
    train_and_save(tiny_dataset, store, TINY_CONFIG, progress=False)
    assert twotower(["reindex", "--artifacts", str(root), "-q"]) == 0
    first_index = store.active_index()
    base = tiny_dataset.interactions
    events = [(str(base.user_ids[u]), "brand-new-item", 1e9 + u) for u in range(40)]
    _record(redis_url, prefix, tmp_path, events)

    done = retrain(tiny_dataset, store, redis_url, prefix, progress=False, min_gate_events=5)
    assert done.published, done.reason
    assert done.warm_start and done.export["exported"] == 40
    # The newest 20% of the events judged both models and were kept out of the new one's training.
    assert (done.gate_events, done.gate_users) == (8, 8) and "(8 users)" in done.reason
    assert done.gate_ndcg is not None and done.previous_gate_ndcg is not None
    published = load_model(store.model_dir(str(done.model_version)))
    assert published.manifest["training"][EVENTS_SEEN] == 32
    assert published.manifest["metrics"]["test"]["users"] == 8
    assert store.active_index() == done.index_version != first_index
    indexed = pd.read_parquet(store.index_dir(str(done.index_version)) / INDEX_ITEMS)
    assert "brand-new-item" in set(indexed.get("item_id", indexed.index))
    client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    assert client.get(RedisKeys(prefix).active_index) == done.index_version  # announced to running services
    client.close()

    waiting = retrain(tiny_dataset, store, redis_url, prefix, progress=False, min_gate_events=5)
    assert not waiting.published and waiting.model_version is None and "nothing trained" in waiting.reason
    assert "8 events are new" in waiting.reason  # the 8 held out last time, which the active model never saw

    more = [(str(base.user_ids[u]), "another-new-item", 2e9 + u) for u in range(40, 80)]
    _record(redis_url, prefix, tmp_path, more)
    refused = retrain(  # a gate none passes
        tiny_dataset, store, redis_url, prefix, progress=False, min_gate_events=5, tolerance=-1.0
    )
    assert not refused.published and "not published" in refused.reason and refused.gate_events == 9
    assert store.active_index() == done.index_version
    with pytest.raises(ValueError, match="at least 1"):
        retrain(tiny_dataset, store, redis_url, prefix, progress=False, min_gate_events=0)


def test_the_gate_holds_out_the_newest_events_except_pairs_seen_before(tiny_dataset: Dataset) -> None:
    base = tiny_dataset.interactions
    first_user, first_item = str(base.user_ids[base.user[0]]), str(base.item_ids[base.item[0]])
    events = pd.DataFrame(
        {
            "user_id": [str(base.user_ids[0]), str(base.user_ids[1]), "new-user", first_user, "new-user"],
            "item_id": [str(base.item_ids[0]), "new-item", str(base.item_ids[2]), first_item, "new-item"],
            # the fourth repeats a base pair, with a clock behind the base's
            "timestamp": [3e9 + 0.7, 3e9 + 1, 3e9 + 2, float(base.timestamp[0]) - 5, 3e9 + 3],
        }
    )
    merged = with_events(tiny_dataset, events["user_id"], events["item_id"], events["timestamp"])
    held = held_out_rows(tiny_dataset, merged, events, first=1)
    rows = merged.interactions.take(held)
    assert set(zip(rows.user_ids[rows.user], rows.item_ids[rows.item], strict=True)) == {
        (str(base.user_ids[1]), "new-item"),
        ("new-user", str(base.item_ids[2])),
        ("new-user", "new-item"),
    }
    assert held.sum() == 3
    # A pair first logged before the held-out events is not held out either.
    again = pd.concat([events, events.iloc[[1]].assign(timestamp=3e9 + 9)], ignore_index=True)
    merged = with_events(tiny_dataset, again["user_id"], again["item_id"], again["timestamp"])
    assert held_out_rows(tiny_dataset, merged, again, first=5).sum() == 0
