"""`python -m service serve | load-features`: the online side's command line (`twotower serve` and
`twotower load-features` hand over to it).

- `serve`: run `service.app:create_app` under uvicorn. Configuration is the `TWOTOWER_*` environment (see
  service/settings.py); `--artifacts` sets TWOTOWER_ARTIFACTS for the app factory, which builds its `Settings`
  once at start-up.
- `load-features`: bulk-write a model artifact's users table (features and histories) into Redis, so a fresh stack
  serves known users: `--redis-url`, else TWOTOWER_REDIS_URL, else the embedded Redis under the data dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

ARTIFACTS_HELP = "artifacts root (default: $TWOTOWER_ARTIFACTS or ./artifacts)"


def configure_logging(level: str) -> None:
    """The service's own log lines (index swaps, store repairs, degraded Redis) to stderr at `level`: uvicorn
    configures only its own loggers, so without this they would be dropped below WARNING."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(args: argparse.Namespace) -> None:
    """Run `service.app:create_app` (as a factory) until interrupted."""
    import uvicorn

    configure_logging(args.log_level)

    from training.artifacts import ArtifactError, ArtifactStore, load_vocabularies

    if args.artifacts is not None:
        os.environ["TWOTOWER_ARTIFACTS"] = str(args.artifacts)
    artifacts = Path(os.environ.get("TWOTOWER_ARTIFACTS", "artifacts"))
    try:  # a user id the served model knows, for the printed example (best effort)
        store = ArtifactStore(artifacts)
        user = load_vocabularies(store.model_dir(store.active_model())).user_ids.tokens[0]
    except (OSError, ValueError, KeyError, IndexError, ArtifactError):
        user = "some-user"
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    body = json.dumps({"user_id": user, "k": 5})
    print(f"serving {artifacts} on {base} (API docs: {base}/docs, readiness: {base}/readyz); try:", flush=True)
    print(f"  curl -s -X POST {base}/v1/recommendations -H 'content-type: application/json' -d '{body}'", flush=True)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        # uvloop and httptools when installed (uvicorn[standard]); the pure-Python ones otherwise.
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=args.access_log,  # off by default: one line per request costs more than serving it
        log_level=args.log_level,
    )


def load_features(args: argparse.Namespace) -> None:
    """Write the users table of a model artifact (default: the model of the active index) into Redis."""
    import asyncio

    from tqdm.auto import tqdm

    from service.errors import StoreUnavailableError
    from service.settings import Settings
    from service.store import FeatureStore
    from training.artifacts import ArtifactStore, load_model

    flags = {"artifacts": args.artifacts, "redis_url": args.redis_url, "data_dir": args.data_dir}
    settings = Settings(**{name: value for name, value in flags.items() if value is not None})
    artifacts = ArtifactStore(settings.artifacts)
    version = args.model or artifacts.active_model()
    users = load_model(artifacts.model_dir(version)).users()
    target = settings.redis_url or f"the embedded Redis under {settings.data_dir / 'redis'}"

    async def write() -> int:
        store = FeatureStore(
            settings.redis_url,
            data_dir=settings.data_dir,
            prefix=settings.redis_prefix,
            max_history=settings.max_history,
            max_seen=settings.max_seen,
            timeout=10.0,
        )
        await store.start()
        try:
            if not await store.ping():
                raise StoreUnavailableError(f"cannot reach Redis: {store.health.error}")
            with tqdm(total=len(users), unit="user", desc="load features", disable=args.quiet) as bar:
                return await store.load_users(users, on_progress=bar.update)
        finally:
            await store.close()

    written = asyncio.run(write())
    print(f"loaded features and histories of {written} users (model {version}) into {target}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="The two-tower online service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "serve",
        prog="twotower serve",
        help="run the HTTP service (FastAPI under uvicorn)",
        description="Serve recommendations from the active index and its model; configuration from TWOTOWER_* "
        "environment variables (see service/settings.py), Redis embedded unless TWOTOWER_REDIS_URL is set.",
    )
    run.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    run.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    run.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    run.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    run.set_defaults(func=serve)
    load = sub.add_parser(
        "load-features",
        prog="twotower load-features",
        help="load users' features and histories from a model artifact into Redis",
        description="Bulk-write (pipelined) the users table of a model artifact into Redis, so a fresh stack "
        "serves known users. Redis: --redis-url, else $TWOTOWER_REDIS_URL, else the embedded one under the data dir.",
    )
    load.add_argument("--artifacts", type=Path, default=None, help=ARTIFACTS_HELP)
    load.add_argument("--model", help="model version (default: the model of the active index)")
    load.add_argument("--redis-url", default=None, help="Redis URL (default: $TWOTOWER_REDIS_URL, else embedded)")
    load.add_argument("--data-dir", type=Path, default=None, help="embedded Redis data dir (default: ./data)")
    load.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    load.set_defaults(func=load_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Read by OpenBLAS when numpy loads (below, with the app or the store): one BLAS thread per serving process,
    # like torch and FAISS (TWOTOWER_THREADS, applied by the app's lifespan).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("TWOTOWER_THREADS", "1"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from service.errors import StoreUnavailableError
    from training.artifacts import ArtifactError

    try:
        args.func(args)
    except (ArtifactError, StoreUnavailableError) as e:
        print(f"twotower {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
