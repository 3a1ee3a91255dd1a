"""`python -m service` / `twotower serve`: run the HTTP service under uvicorn.

Configuration is the `TWOTOWER_*` environment (see service/settings.py); `--artifacts` sets
TWOTOWER_ARTIFACTS for the app factory, which builds its `Settings` once at start-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    artifacts: Path | None = None,
    access_log: bool = False,
    log_level: str = "info",
) -> None:
    """Run `service.app:create_app` (as a factory) until interrupted."""
    import uvicorn

    if artifacts is not None:
        os.environ["TWOTOWER_ARTIFACTS"] = str(artifacts)
    # Read by OpenBLAS when numpy/FAISS load (the app is imported below): one BLAS thread per process, like
    # torch and FAISS (TWOTOWER_THREADS); spinning BLAS workers stalled requests on a busy machine.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ.get("TWOTOWER_THREADS", "1"))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        # uvloop and httptools when installed (uvicorn[standard]); the pure-Python ones otherwise.
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        access_log=access_log,  # off by default: one line per request costs more than serving it
        log_level=log_level,
    )


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifacts", type=Path, default=None, help="artifacts root (default: $TWOTOWER_ARTIFACTS or ./artifacts)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Run the two-tower HTTP service.")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    serve(args.host, args.port, artifacts=args.artifacts, access_log=args.access_log, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
