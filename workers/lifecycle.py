"""What every worker process shares: stop on SIGTERM/SIGINT, a Redis client, metrics, heartbeat and /healthz.

``WorkerRuntime`` is a context manager: it sets everything up, serves ``/healthz`` and ``/metrics`` on
``port`` and, on exit, marks the worker stopped and removes its health key.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType

from pipeline.config import Config, ConfigError
from pipeline.health import HealthServer, Heartbeat
from pipeline.metrics import Metrics
from pipeline.streams import DeadLetter, StreamClient, StreamsUnavailable, redis_attempt_timeout_s

logger = logging.getLogger(__name__)


def install_stop_handlers(
    stop: threading.Event, *later: tuple[threading.Event, str], message: str = "stop requested, draining"
) -> None:
    """Each SIGTERM/SIGINT takes the next step: the first sets ``stop`` (drain; logs ``message``), each further one
    the next event of ``later`` (logging its text); once every step is taken, the next signal restores the default
    handler and re-raises it (the process ends at once)."""
    steps = [(stop, message), *later]

    def handle(signum: int, _frame: FrameType | None) -> None:
        for event, text in steps:
            if not event.is_set():
                logger.info(text, extra={"signal": signal.Signals(signum).name})
                event.set()
                return
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)


def default_worker_name(role: str) -> str:
    return f"{socket.gethostname()}-{role}"


def keeper_join_s(config: Config) -> float:
    """How long a stopping worker waits for its in-hand keeper thread (``workers.in_hand``), which may be inside one
    Redis call."""
    return config.redis.connect_timeout_s + 1.0


def stop_bound_s(config: Config) -> float:
    """How long a worker may take to exit after SIGTERM: ``worker.drain_timeout_s`` to finish what it holds (retries
    through a Redis outage end there too), then joining its in-hand keeper (``keeper_join_s``), then waiting for a
    heartbeat write in flight before removing its key (one Redis attempt, ``WorkerRuntime.exit_wait_s``): 36.2 s with
    config.toml's values. Whatever stops workers must wait longer before SIGKILL: deploy/'s grace periods (45 s) and
    ``lineinspect run``."""
    exit_wait_s = redis_attempt_timeout_s(config.redis, config.streams)
    return config.worker.drain_timeout_s + keeper_join_s(config) + exit_wait_s


class WorkerRuntime:
    """Redis client, Metrics, Heartbeat and the health/metrics HTTP server of one worker."""

    def __init__(
        self, config: Config, redis_url: str, role: str, name: str, port: int, port_setting: str = "worker.health_port"
    ) -> None:
        self.config = config
        self.role = role
        self.name = name
        self.stop = threading.Event()
        self.client = StreamClient(redis_url, config.redis, config.streams)
        self.client.stop_retrying_after(self.stop, config.worker.drain_timeout_s)  # a stop during an outage exits
        self.metrics = Metrics()
        self.metrics.watch_redis(self.client.ping)  # lineinspect_redis_up: an outage shows on every worker's /metrics
        self.heartbeat = Heartbeat(self.client, config.streams.prefix, role, name)
        # At exit, how long to wait for a beat in flight from another thread (Redis slow) before removing the key: one
        # attempt's socket timeout, by when Redis has answered it or the attempt has timed out. A shorter wait let
        # the process exit first, and the write, already sent, land later: the stopped worker's key read "ok" for its
        # whole TTL. Exiting waits at most this much more (``stop_bound_s``).
        self.exit_wait_s = self.client.attempt_timeout_s
        try:
            self.server = HealthServer(self.heartbeat, self.metrics, port)
        except OSError as error:
            msg = (f"{port_setting}: cannot serve /healthz and /metrics on port {port} ({error.strerror}); "
                   "choose a free port, or 0 for any")  # fmt: skip
            raise ConfigError(msg) from None

    def report_dead_letters(self, line_id: str, letters: Sequence[DeadLetter]) -> None:
        """Count and log entries a worker has just committed to the dead-letter stream."""
        for letter in letters:
            self.metrics.dead_letters.labels(line_id, letter.reason).inc()
            logger.warning(
                "dead-lettered", extra={"entry_id": letter.entry_id, "reason": letter.reason, "detail": letter.detail}
            )

    def __enter__(self) -> WorkerRuntime:
        self.server.start()
        self.metrics.worker_up.labels(self.role, self.name).set(1)
        logger.info("worker started", extra={"worker": self.name, "health_port": self.server.port})
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.metrics.worker_up.labels(self.role, self.name).set(0)
        if isinstance(exc, StreamsUnavailable):  # deleting the key would wait a socket timeout more; it expires
            self.heartbeat.stop()
        else:
            self.heartbeat.clear(wait_s=self.exit_wait_s)
        self.server.stop()
        self.client.close()
        logger.info("worker stopped", extra={"worker": self.name, "error": repr(exc) if exc else None})
