"""`service.redis_server.EmbeddedRedis`: a server started, owned and stopped by the object that started it."""

from __future__ import annotations

from pathlib import Path

from service.redis_server import EmbeddedRedis, _pid_alive


def test_a_second_embedded_redis_on_the_same_dir_attaches_and_leaves_it_running(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    url = first.start()
    try:
        second = EmbeddedRedis(tmp_path)
        assert second.start() == url
        assert not second.owned
        second.stop()
        assert first.pid is not None and _pid_alive(first.pid)
    finally:
        first.stop()
