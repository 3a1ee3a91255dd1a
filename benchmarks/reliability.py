"""Reliability benchmark: the real stack (one uvicorn process serving `service.app.create_app`, a real redis-server
on a free loopback port) attacked and broken on purpose, each part bounded in time.

    python -m benchmarks.reliability                     (about 5 minutes; --quick: about 1)

1. **schemathesis** against the service's own /openapi.json: every operation, positive and negative (invalid)
   data; each answer is checked for a 5xx, for conformance to the documented response schema and for a status
   the schema does not document;
2. **hostile inputs** of our own: values JSON does not allow, surrogates, huge and deep bodies, every limit; each
   case's status, whether the error names the field, its time, and whether the server answers /healthz after;
3. **Redis killed (SIGKILL) and frozen (SIGSTOP)** under a steady load of recommendations and events (each event
   a unique item, so its presence can be checked): statuses during the outage, time to recover, and afterwards
   acknowledged events missing from Redis (`lost_events`) and events answered 503 found in Redis
   (`answered_503_but_applied`);
4. **three swaps under load**: published pairs moved to while recommendations run; requests that failed and
   answers whose (model_version, index_version) was never published together (`mixed_pairs`), p99 during the
   swaps beside p99 without;
5. **bad artifacts** (truncated index, flipped bytes, non-finite weights in either tower, another model's vectors,
   wrong dimension): each pinned through the admin API, refused (409) with a message naming the file, while the
   old pair keeps serving;
6. **one heavy user** (100,000 events) asked for continuously beside other clients: the others' p99 against a
   run where that client asks for an ordinary user.

Every count whose goal is zero is named so in the JSON (`5xx`, `schema_violations`, `undocumented_statuses`,
`lost_events`, `answered_503_but_applied`, `failed_requests`, `mixed_pairs`). Writes
`benchmarks/results/reliability.json` and prints a table. The load generator runs in this process and shares the
machine's cores with the server: latencies are comparable within a run, not a deployment's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.serve import PREFIX, load_users, log, server

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
ADMIN_TOKEN = "reliability-benchmark-admin-token"
K = 10
HEAVY_EVENTS = 100_000
ZERO_GOALS = ("5xx", "schema_violations", "undocumented_statuses", "lost_events", "answered_503_but_applied")


@dataclass
class Budget:
    """Seconds per phase; `--quick` shrinks all of them."""

    schemathesis_examples: int = 400  # per operation and generation mode
    steady: float = 4.0
    outage: float = 4.0
    after: float = 6.0
    heavy: float = 8.0
    concurrency: int = 8

    @classmethod
    def quick(cls) -> Budget:
        return cls(schemathesis_examples=25, steady=1.5, outage=1.5, after=3.0, heavy=2.0, concurrency=4)


# --------------------------------------------------------------------------- artifacts


@dataclass
class Stack:
    root: Path
    redis: Any  # service.redis_server.EmbeddedRedis
    base: str = ""
    users: list[str] = field(default_factory=list)
    good_index: str = ""
    pairs: dict[str, str] = field(default_factory=dict)  # index version -> model version, of every good pair
    swap_to: list[str] = field(default_factory=list)  # index versions the swap phase publishes, in order
    broken: dict[str, tuple[str, str]] = field(default_factory=dict)  # case -> (index version, expected in message)


def _train(root: Path, seed: int) -> str:
    from training.artifacts import ArtifactStore
    from training.config import TrainConfig
    from training.dataset import synthetic
    from training.model import TowerConfig
    from training.train import train_and_save

    data = synthetic(n_users=3000, n_items=2000, n_clusters=8, interactions_per_user=25, seed=0)
    config = TrainConfig(epochs=4, seed=seed, eval_every=4, refit="never", tower=TowerConfig(dim=32))
    directory = train_and_save(data, ArtifactStore(root), config, 0.1, progress=False)
    assert directory is not None  # one process: it is the one that saves
    return directory.name


def _index(root: Path, model_version: str, vectors: np.ndarray | None = None, ids: list[str] | None = None) -> str:
    """An exact index over the model's saved item vectors (or `vectors` with `ids`, whatever the model holds),
    saved but not activated."""
    from training.artifacts import INDEX_VERSION_PREFIX, ArtifactStore, load_model, new_version
    from training.index import save_index
    from training.index_build import build_index

    store = ArtifactStore(root)
    if vectors is None or ids is None:
        ids, vectors = load_model(store.model_dir(model_version)).item_embeddings()
    item_index, report = build_index(
        vectors, ids, "Flat", 0.95, None, K, model_version=model_version, progress=False,
        measure_speed=False,
    )  # fmt: skip
    version = new_version(INDEX_VERSION_PREFIX)
    save_index(item_index, store.index_dir(version), report)
    return version


def _poisoned_model(root: Path, model_version: str, tower: str, value: float) -> str:
    """The model with one weight of `tower` set to `value`, saved as a complete artifact (checksums agree)."""
    import torch

    from training.artifacts import ArtifactStore, load_model, save_model
    from training.features import encode_item_frame
    from training.model import embed_items

    store = ArtifactStore(root)
    loaded = load_model(store.model_dir(model_version))
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        next(getattr(model, tower).parameters()).view(-1)[0] = value
    catalog = loaded.catalog()
    embeddings = embed_items(model, encode_item_frame(model.spec, model.vocabs, catalog))
    directory = save_model(
        store, model, catalog=catalog, users=loaded.users(), item_embeddings=np.nan_to_num(embeddings),
        training=loaded.manifest["training"], metrics={},
    )  # fmt: skip
    return directory.name


def _damaged_copy(root: Path, index_version: str, damage: Callable[[Path], None], *, checksums_agree: bool) -> str:
    """A copy of an index under a new version, damaged by `damage`; with `checksums_agree` the manifest is
    rewritten after the damage (as a buggy writer would), so the loader's own checks must catch it."""
    from training.artifacts import INDEX_VERSION_PREFIX, MANIFEST, ArtifactStore, new_version, write_manifest

    store = ArtifactStore(root)
    version = new_version(INDEX_VERSION_PREFIX)
    target = store.index_dir(version)
    shutil.copytree(store.index_dir(index_version), target)
    manifest = {k: v for k, v in json.loads((target / MANIFEST).read_text()).items() if k != "files"}
    manifest["version"] = version
    if checksums_agree:
        damage(target)
        write_manifest(target, manifest)
    else:
        write_manifest(target, manifest)
        damage(target)
    return version


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _flip(name: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / name
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))

    return damage


def prepare(root: Path, redis: Any) -> Stack:
    """Three trained models, the good pairs the swap phase moves between, and one broken index per bad case."""
    from training.artifacts import ArtifactStore, load_model
    from training.index import INDEX_FILE, VECTORS_FILE

    log("training three small models (synthetic data) and building their indexes ...")
    models = [_train(root, seed) for seed in range(3)]
    stack = Stack(root, redis)
    indexes = [_index(root, m) for m in (*models, models[0])]
    stack.good_index, stack.swap_to = indexes[0], indexes[1:]
    stack.pairs = dict(zip(indexes, (*models, models[0]), strict=True))
    first = models[0]
    ids, vectors = load_model(ArtifactStore(root).model_dir(first)).item_embeddings()
    _, other_vectors = load_model(ArtifactStore(root).model_dir(models[1])).item_embeddings()
    nan_user = _poisoned_model(root, first, "user_tower", float("nan"))
    inf_item = _poisoned_model(root, first, "item_tower", float("inf"))
    rng = np.random.default_rng(0)
    stack.broken = {
        "truncated index": (_damaged_copy(root, indexes[0], _truncate(INDEX_FILE), checksums_agree=True), INDEX_FILE),
        "flipped bytes": (_damaged_copy(root, indexes[0], _flip(VECTORS_FILE), checksums_agree=False), VECTORS_FILE),
        "non-finite user tower": (_index(root, nan_user, vectors, ids), "user_tower.safetensors"),
        "non-finite item tower": (_index(root, inf_item, vectors, ids), "item_tower.safetensors"),
        "another model's index": (_index(root, first, other_vectors, ids), "item vectors differ"),
        "wrong dimension": (
            _index(root, first, rng.normal(size=(len(ids), vectors.shape[1] // 2)).astype(np.float32), ids),
            "manifest.json",
        ),
    }
    ArtifactStore(root).set_active_index(stack.good_index)
    return stack


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    at: float  # seconds since the load started
    kind: str  # "recommend" | "event"
    status: int  # 0: no answer (transport error)
    ms: float
    degraded: bool = False
    pair: tuple[str, str] | None = None
    item: str | None = None


_EVENT_NUMBERS = itertools.count(1)  # one sequence for the whole run: an item names exactly one event ever posted


class Load:
    """Concurrent clients posting recommendations (and, with `events`, one client posting unique events) until
    stopped; every answer is kept as an `Outcome`."""

    def __init__(self, base: str, users: Sequence[str], concurrency: int, *, events: bool, ask: str | None = None):
        self.base, self.users, self.concurrency, self.events, self.ask = base, list(users), concurrency, events, ask
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._started = 0.0

    async def _recommender(self, client: httpx.AsyncClient, worker: int, rng: np.random.Generator) -> None:
        while not self._stop.is_set():
            asks_heavy = self.ask is not None and worker == 0
            user = self.ask if asks_heavy else self.users[int(rng.integers(len(self.users)))]
            started = time.perf_counter()
            try:
                response = await client.post("/v1/recommendations", json={"user_id": user, "k": K})
                body = response.json() if response.status_code == 200 else {}
                status = response.status_code
            except httpx.HTTPError:
                body, status = {}, 0
            self.outcomes.append(
                Outcome(
                    started - self._started, "recommend", status, (time.perf_counter() - started) * 1000,
                    bool(body.get("degraded")), (body["model_version"], body["index_version"]) if body else None,
                    "heavy" if asks_heavy else None,
                )
            )  # fmt: skip

    async def _eventer(self, client: httpx.AsyncClient, rng: np.random.Generator) -> None:
        while not self._stop.is_set():
            item = f"ev-{os.getpid()}-{next(_EVENT_NUMBERS)}"
            user = self.users[int(rng.integers(len(self.users)))]
            started = time.perf_counter()
            try:
                response = await client.post("/v1/events", json={"user_id": user, "item_id": item})
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            self.outcomes.append(
                Outcome(started - self._started, "event", status, (time.perf_counter() - started) * 1000, item=item)
            )
            await asyncio.sleep(0.005)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        self._started = time.perf_counter()
        limits = httpx.Limits(max_connections=self.concurrency + 2)
        async with httpx.AsyncClient(base_url=self.base, timeout=30, limits=limits) as client:
            rngs = [np.random.default_rng(i) for i in range(self.concurrency + 1)]
            tasks = [asyncio.create_task(self._recommender(client, i, rngs[i])) for i in range(self.concurrency)]
            if self.events:
                tasks.append(asyncio.create_task(self._eventer(client, rngs[-1])))
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)

    def now(self) -> float:
        return time.perf_counter() - self._started


def _p(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _statuses(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) + (" degraded" if o.degraded else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- 1. schemathesis


def run_schemathesis(base: str, examples: int) -> dict[str, Any]:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    counts = {"cases": 0, "5xx": 0, "schema_violations": 0, "undocumented_statuses": 0}
    by_operation: dict[str, dict[str, int]] = {}
    samples: list[str] = []
    no_cases: list[str] = []
    settings = hypothesis.settings(
        max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip

    def check(label: str, case: Any) -> None:
        response = case.call(base_url=base, headers=headers, timeout=30)
        mine = by_operation.setdefault(label, {"cases": 0, "5xx": 0, "undocumented_statuses": 0})
        counts["cases"] += 1
        mine["cases"] += 1
        if response.status_code >= 500:
            counts["5xx"] += 1
            mine["5xx"] += 1
            samples.append(f"{label} -> {response.status_code}: {case.body!r:.200}")
        for conformance, key in ((response_schema_conformance, "schema_violations"),
                                 (status_code_conformance, "undocumented_statuses")):  # fmt: skip
            try:
                case.validate_response(response, checks=[conformance])
            except Exception as e:  # schemathesis raises its failure (group) types
                counts[key] += 1
                mine[key] = mine.get(key, 0) + 1
                if len(samples) < 10:
                    samples.append(f"{label} {key}: {str(e).splitlines()[0][:200]}")

    def test_of(label: str) -> Callable[[Any], None]:
        def probe(case: Any) -> None:
            check(label, case)

        return probe

    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an unloadable operation fails the run, as it should
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                settings(hypothesis.given(case=operation.as_strategy(generation_mode=mode))(test_of(label)))()
            except hypothesis.errors.Unsatisfiable:  # no invalid request exists (an operation without inputs)
                no_cases.append(f"{label} {mode.value}")
    return {**counts, "seconds": round(time.perf_counter() - started, 1), "by_operation": by_operation,
            "samples": samples, "no_cases": no_cases}  # fmt: skip


# --------------------------------------------------------------------------- 2. hostile inputs


def hostile_cases(limits: dict[str, int]) -> list[tuple[str, str, str, bytes, dict[str, str], int, str | None]]:
    """(name, method, path, body, headers, expected status, a field the error must name)."""
    js = {"content-type": "application/json"}
    admin = {**js, "authorization": f"Bearer {ADMIN_TOKEN}"}
    max_k, max_history, max_batch = limits["max_k"], limits["max_history"], limits["max_batch"]

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    cases = [
        ("k NaN", "POST", "/v1/recommendations", b'{"k": NaN}', js, 422, "k"),
        ("k Infinity", "POST", "/v1/recommendations", b'{"k": Infinity}', js, 422, "k"),
        ("feature -Infinity", "POST", "/v1/recommendations", b'{"features": {"segment": -Infinity}}', js, 422,
         "segment"),
        ("history 1e400", "POST", "/v1/recommendations", b'{"history": ["i1", 1e400]}', js, 422, "history"),
        ("batch NaN deep", "POST", "/v1/recommendations/batch", b'{"requests": [{"k": 1}, {"features": {"x": [NaN]}}]}',
         js, 422, "requests"),
        ("event timestamp NaN", "POST", "/v1/events", b'{"user_id": "u", "item_id": "i", "timestamp": NaN}', js, 422,
         "timestamp"),
        ("lone surrogate user_id", "POST", "/v1/recommendations", b'{"user_id": "\\ud800"}', js, 422, "user_id"),
        ("lone surrogate key", "POST", "/v1/recommendations", b'{"features": {"\\udfff": "x"}}', js, 422, "features"),
        ("raw surrogate bytes", "POST", "/v1/events", b'{"user_id": "\xed\xa0\x80", "item_id": "i"}', js, 422,
         "user_id"),
        ("k true", "POST", "/v1/recommendations", body({"k": True}), js, 422, "k"),
        ("k '10'", "POST", "/v1/recommendations", body({"k": "10"}), js, 422, "k"),
        ("exclude_seen 0", "POST", "/v1/recommendations", body({"exclude_seen": 0}), js, 422, "exclude_seen"),
        ("digit string feature", "POST", "/v1/recommendations", body({"features": {"segment": "9" * 5000}}), js, 422,
         "segment"),
        ("huge int feature", "POST", "/v1/recommendations", b'{"features": {"segment": ' + b"9" * 4000 + b"}}", js,
         422, "segment"),
        ("k over max", "POST", "/v1/recommendations", body({"k": max_k + 1}), js, 422, "k"),
        ("history over max", "POST", "/v1/recommendations", body({"history": ["i"] * (max_history + 1)}), js, 422,
         "history"),
        ("batch over max", "POST", "/v1/recommendations/batch", body({"requests": [{"k": 1}] * (max_batch + 1)}), js,
         422, "requests"),
        ("user_id too long", "POST", "/v1/recommendations", body({"user_id": "u" * 257}), js, 422, "user_id"),
        ("oversized string echo", "POST", "/v1/recommendations", body({"features": {"segment": "x" * 900_000}}), js,
         422, "segment"),
        ("body over limit", "POST", "/v1/recommendations", body({"history": ["i" * 200] * 6000}), js, 413, None),
        ("deep nesting", "POST", "/v1/recommendations", b'{"features": {"x": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}}", js, 400, None),
        ("not JSON", "POST", "/v1/recommendations", b"{nope", js, 422, None),
        ("unknown field", "POST", "/v1/recommendations", body({"exlude": []}), js, 422, "exlude"),
        ("events both forms", "POST", "/v1/events", body({"user_id": "u", "item_id": "i", "events": []}), js, 422,
         "events"),
        ("similar k=0", "GET", "/v1/items/x/similar?k=0", b"", {}, 422, "k"),
        ("similar unknown item", "GET", "/v1/items/no-such-item/similar", b"", {}, 404, None),
        ("admin without token", "POST", "/v1/admin/reload", b"", {}, 401, None),
        ("admin wrong token", "POST", "/v1/admin/reload", b"", {"authorization": "Bearer wrong-token-000000"}, 401,
         None),
        ("pin path traversal", "POST", "/v1/admin/pin", body({"index_version": "../../etc"}), admin, 422,
         "index_version"),
        ("pin unknown version", "POST", "/v1/admin/pin", body({"index_version": "idx-20000101T000000000000Z-ffffff"}),
         admin, 404, None),
    ]  # fmt: skip
    return cases


def run_hostile(base: str, limits: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for name, method, path, content, headers, expected, field_name in hostile_cases(limits):
            started = time.perf_counter()
            response = client.request(method, path, content=content or None, headers=headers)
            ms = (time.perf_counter() - started) * 1000
            try:
                parsed: Any = json.loads(response.text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
                valid_json = True
            except ValueError:
                parsed, valid_json = None, False
            names = None
            if field_name is not None:
                names = field_name in json.dumps(parsed.get("detail") if isinstance(parsed, dict) else parsed)
            healthy = client.get("/healthz").status_code == 200
            rows.append({
                "case": name, "status": response.status_code, "expected": expected,
                "ok": response.status_code == expected and (names is not False) and valid_json and healthy,
                "names_field": names, "valid_json": valid_json, "bytes": len(response.content), "ms": round(ms, 1),
                "healthy_after": healthy,
            })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- 3. Redis outages


async def _present(redis_url: str, items: set[str]) -> set[str]:
    """Which of these event items Redis holds: in the event log, each applied call wrote exactly there."""
    import redis.asyncio as aioredis

    from training.redis_keys import RedisKeys

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    found: set[str] = set()
    try:
        last = "-"
        while True:
            batch: list[Any] = list(await client.xrange(RedisKeys(PREFIX).events, min=last, count=10_000) or [])
            for _, fields in batch:
                if fields.get("item_id") in items:
                    found.add(str(fields["item_id"]))
            if len(batch) < 10_000:
                return found
            last = "(" + str(batch[-1][0])
    finally:
        await client.aclose()


def run_outage(stack: Stack, how: str, budget: Budget) -> dict[str, Any]:
    """A steady load, then Redis killed (and restarted on its files) or frozen (and resumed), then recovery."""
    redis = stack.redis

    async def go() -> dict[str, Any]:
        load = Load(stack.base, stack.users, budget.concurrency, events=True)
        async with load.running():
            await asyncio.sleep(budget.steady)
            down_at = load.now()
            if how == "sigkill":
                os.kill(redis.pid, signal.SIGKILL)
                await asyncio.to_thread(redis.stop)  # reaps the killed process
                await asyncio.sleep(budget.outage)
                await asyncio.to_thread(redis.start)  # same port, same files: the AOF brings the data back
            else:
                os.kill(redis.pid, signal.SIGSTOP)
                await asyncio.sleep(budget.outage)
                os.kill(redis.pid, signal.SIGCONT)
            back_at = load.now()
            await asyncio.sleep(budget.after)
        outcomes = load.outcomes
        during = [o for o in outcomes if down_at <= o.at < back_at]
        after = [o for o in outcomes if o.at >= back_at]
        recovered = next(
            (o.at for o in sorted(after, key=lambda o: o.at) if o.kind == "recommend" and o.status == 200
             and not o.degraded), None,
        )  # fmt: skip
        events = [o for o in outcomes if o.kind == "event"]
        present = await _present(redis.url, {o.item for o in events if o.item})
        acked = {o.item for o in events if o.status == 200}
        refused = {o.item for o in events if o.status == 503}
        unknown = [o for o in events if o.status not in (200, 503)]
        return {
            "recommendations_during": _statuses([o for o in during if o.kind == "recommend"]),
            "events_during": _statuses([o for o in during if o.kind == "event"]),
            "recommend_p99_ms_during": _p([o.ms for o in during if o.kind == "recommend"], 99),
            "seconds_to_recover": None if recovered is None else round(recovered - back_at, 2),
            "requests": len(outcomes),
            # a 503 to an event is the documented refusal (nothing written); any other 5xx is a failure
            "5xx": sum(o.status >= 500 and not (o.kind == "event" and o.status == 503) for o in outcomes),
            "events_acknowledged": len(acked),
            "events_answered_503": len(refused),
            "events_without_answer": len(unknown),
            "lost_events": len(acked - present),
            "answered_503_but_applied": len(refused & present),
        }

    return asyncio.run(go())


# --------------------------------------------------------------------------- 4. swaps under load


def run_swaps(stack: Stack, budget: Budget) -> dict[str, Any]:
    from training.artifacts import ArtifactStore
    from training.reindex import notify_redis

    store = ArtifactStore(stack.root)
    published = {(model, index) for index, model in stack.pairs.items()}

    async def go() -> dict[str, Any]:
        load = Load(stack.base, stack.users, budget.concurrency, events=False)
        windows = []
        async with load.running():
            await asyncio.sleep(budget.steady)
            for version in stack.swap_to:
                start = load.now()
                store.set_active_index(version)
                notify_redis(stack.redis.url, PREFIX, version)
                async with httpx.AsyncClient(base_url=stack.base) as probe:
                    while (await probe.get("/readyz")).json().get("index_version") != version:
                        await asyncio.sleep(0.02)
                windows.append((start, load.now()))
                await asyncio.sleep(budget.steady / 2)
        rec = [o for o in load.outcomes if o.kind == "recommend"]
        first, last = windows[0][0], windows[-1][1]
        during = [o.ms for o in rec if first <= o.at <= last]
        steady = [o.ms for o in rec if o.at < first]
        seen_pairs = {o.pair for o in rec if o.pair is not None}
        p99_during, p99_steady = _p(during, 99), _p(steady, 99)
        return {
            "swaps": len(windows),
            "swap_seconds": [round(b - a, 2) for a, b in windows],
            "requests": len(rec),
            "failed_requests": sum(o.status != 200 for o in rec),
            "mixed_pairs": sum(o.pair is not None and o.pair not in published for o in rec),
            "pairs_served": len(seen_pairs),
            "p99_ms_steady": p99_steady,
            "p99_ms_during_swaps": p99_during,
            "p99_ratio": round(p99_during / p99_steady, 2) if p99_during and p99_steady else None,
        }

    return asyncio.run(go())


# --------------------------------------------------------------------------- 5. bad artifacts


def run_bad_artifacts(stack: Stack) -> list[dict[str, Any]]:
    rows = []
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=stack.base, timeout=60) as client:
        serving = client.get("/readyz").json()["index_version"]
        for case, (version, expected) in stack.broken.items():
            response = client.post("/v1/admin/pin", json={"index_version": version}, headers=admin)
            detail = str(response.json().get("detail", ""))
            ready = client.get("/readyz").json()
            answer = client.post("/v1/recommendations", json={"user_id": stack.users[0], "k": K})
            rows.append({
                "case": case, "status": response.status_code, "names": expected, "message_names_it": expected in detail,
                "still_serving": ready["index_version"] == serving and answer.status_code == 200
                and answer.json()["index_version"] == serving,
                "message": detail[:240],
            })  # fmt: skip
        client.post("/v1/admin/reload", headers=admin)
    return rows


# --------------------------------------------------------------------------- 6. one heavy user


def run_heavy_user(stack: Stack, budget: Budget) -> dict[str, Any]:
    heavy = "heavy-user"

    async def measure(ask: str) -> list[float]:
        load = Load(stack.base, stack.users, budget.concurrency, events=False, ask=ask)
        async with load.running():
            await asyncio.sleep(budget.heavy)
        return [o.ms for o in load.outcomes if o.kind == "recommend" and o.item is None and o.status == 200]

    async def go() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=stack.base, timeout=60) as client:
            for start in range(0, HEAVY_EVENTS, 1000):
                events = [{"user_id": heavy, "item_id": f"heavy-{i}"} for i in range(start, start + 1000)]
                response = await client.post("/v1/events", json={"events": events})
                response.raise_for_status()
            answer = (await client.post("/v1/recommendations", json={"user_id": heavy, "k": K})).json()
        ordinary = await measure(stack.users[1])
        with_heavy = await measure(heavy)
        p99_ordinary, p99_heavy = _p(ordinary, 99), _p(with_heavy, 99)
        return {
            "heavy_user_events": HEAVY_EVENTS,
            "heavy_user_answer_path": answer.get("path"),
            "others_p50_ms_without": _p(ordinary, 50),
            "others_p50_ms_with": _p(with_heavy, 50),
            "others_p99_ms_without": p99_ordinary,
            "others_p99_ms_with": p99_heavy,
            "p99_ratio": round(p99_heavy / p99_ordinary, 2) if p99_heavy and p99_ordinary else None,
        }

    return asyncio.run(go())


# --------------------------------------------------------------------------- driver


@contextlib.contextmanager
def stack_running(work: Path) -> Iterator[Stack]:
    from service.redis_server import EmbeddedRedis, free_port

    redis = EmbeddedRedis(work / "redis", port=free_port())
    redis.start()
    try:
        stack = prepare(work / "artifacts", redis)
        load_users(stack.root, redis.url, work / "data")
        from training.artifacts import ArtifactStore, load_model

        model = ArtifactStore(stack.root).model_dir(stack.pairs[stack.good_index])
        stack.users = [str(u) for u in load_model(model).users().index[:2000]]
        env = {"TWOTOWER_ADMIN_TOKEN": ADMIN_TOKEN, "TWOTOWER_POLL_SECONDS": "1", "TWOTOWER_REDIS_TIMEOUT": "0.5"}
        with server(stack.root, work / "data", redis.url, app="service.app:create_app", extra_env=env) as base:
            stack.base = base
            yield stack
    finally:
        if redis.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis.pid, signal.SIGCONT)
        redis.stop()


def run(budget: Budget) -> dict[str, Any]:
    from service.settings import Settings

    defaults = Settings()
    limits = {"max_k": defaults.max_k, "max_history": defaults.max_history, "max_batch": defaults.max_batch}
    result: dict[str, Any] = {"budget": budget.__dict__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp, stack_running(Path(tmp)) as stack:
        log("1/6 schemathesis ...")
        result["schemathesis"] = run_schemathesis(stack.base, budget.schemathesis_examples)
        log("2/6 hostile inputs ...")
        result["hostile_inputs"] = run_hostile(stack.base, limits)
        log("3/6 Redis killed, then frozen, under load ...")
        result["redis"] = {how: run_outage(stack, how, budget) for how in ("sigkill", "sigstop")}
        log("4/6 three swaps under load ...")
        result["swaps"] = run_swaps(stack, budget)
        log("5/6 bad artifacts ...")
        result["bad_artifacts"] = run_bad_artifacts(stack)
        log("6/6 one heavy user ...")
        result["heavy_user"] = run_heavy_user(stack, budget)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    result["zero_goals"] = zero_goals(result)
    return result


def zero_goals(result: dict[str, Any]) -> dict[str, int]:
    """Every count whose goal is zero, summed over the phases that measure it."""
    redis = result["redis"].values()
    return {
        "5xx": result["schemathesis"]["5xx"] + sum(r["status"] >= 500 for r in result["hostile_inputs"])
        + sum(r["5xx"] for r in redis),
        "schema_violations": result["schemathesis"]["schema_violations"],
        "undocumented_statuses": result["schemathesis"]["undocumented_statuses"],
        "lost_events": sum(r["lost_events"] for r in redis),
        "answered_503_but_applied": sum(r["answered_503_but_applied"] for r in redis),
        "failed_requests": result["swaps"]["failed_requests"],
        "mixed_pairs": result["swaps"]["mixed_pairs"],
        "hostile_cases_not_as_expected": sum(not r["ok"] for r in result["hostile_inputs"]),
        "bad_artifacts_not_refused": sum(
            not (r["status"] == 409 and r["message_names_it"] and r["still_serving"]) for r in result["bad_artifacts"]
        ),
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    st, swaps, heavy = result["schemathesis"], result["swaps"], result["heavy_user"]
    lines = [
        f"schemathesis: {st['cases']} cases in {st['seconds']} s: 5xx {st['5xx']}, schema violations "
        f"{st['schema_violations']}, undocumented statuses {st['undocumented_statuses']}",
        "",
        "| hostile input | status | expected | names field | bytes | ms | healthy after |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    for r in result["hostile_inputs"]:
        lines.append(
            f"| {r['case']} | {r['status']} | {r['expected']} | {r['names_field']} | {r['bytes']} | {r['ms']} | "
            f"{r['healthy_after']} |"
        )
    lines += ["", "| Redis | recommendations during | events during | recover s | acked | 503 | lost | 503 applied |",
              "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for how, r in result["redis"].items():
        lines.append(
            f"| {how} | {r['recommendations_during']} | {r['events_during']} | {r['seconds_to_recover']} | "
            f"{r['events_acknowledged']} | {r['events_answered_503']} | {r['lost_events']} | "
            f"{r['answered_503_but_applied']} |"
        )
    lines += [
        "",
        f"swaps: {swaps['swaps']} under {swaps['requests']} requests: failed {swaps['failed_requests']}, mixed pairs "
        f"{swaps['mixed_pairs']}, p99 {swaps['p99_ms_during_swaps']} ms during vs {swaps['p99_ms_steady']} ms "
        f"steady ({swaps['p99_ratio']}x)",
        "",
        "| bad artifact | status | message names | still serving |",
        "|---|---:|---|---|",
    ]
    for r in result["bad_artifacts"]:
        lines.append(f"| {r['case']} | {r['status']} | {r['names']}: {r['message_names_it']} | {r['still_serving']} |")
    lines += [
        "",
        f"heavy user ({heavy['heavy_user_events']:,} events): others' p99 {heavy['others_p99_ms_with']} ms vs "
        f"{heavy['others_p99_ms_without']} ms without ({heavy['p99_ratio']}x); p50 {heavy['others_p50_ms_with']} "
        f"vs {heavy['others_p50_ms_without']} ms",
        "",
        "zero goals: " + ", ".join(f"{k} {v}" for k, v in result["zero_goals"].items()),
        f"({result['seconds']} s, load average {result['loadavg_1m']})",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long phases (what the test suite runs)")
    parser.add_argument("--examples", type=int, default=None, help="schemathesis examples per operation and mode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budget = Budget.quick() if args.quick else Budget()
    if args.examples is not None:
        budget.schemathesis_examples = args.examples
    result = run(budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
