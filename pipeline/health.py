"""Worker liveness: a ``Heartbeat`` (in-process state + Redis key with a TTL) and an HTTP server for it.

The worker's loop beats between steps; during one long step (a batch being scored, a sink's overlays being written)
``workers.in_hand.InHand`` refreshes the beat from its own thread, but only up to ``worker.max_batch_duration_s``, so
a hung model still turns the worker unhealthy. Writes to Redis go one at a time, each built when its turn comes, so
a beat never lands after a newer one (a keeper's "ok" after the loop's "draining"), and none after the key is removed
at stop, unless Redis stalls past ``clear``'s wait and the process exits before the write lands.

While a worker starts (a scorer loading its model, which may outlast the TTL), ``StartingBeat`` beats "starting"
from its own thread, up to ``worker.max_startup_s``; past it the beats stop, as for a hung batch.

A step taken for hung that is still running once ``/livez`` says so (its beats stopped a TTL ago, and the worker is not
waiting for Redis) ends the process with ``HUNG_EXIT_STATUS`` (``Heartbeat.exit_if_hung``): only Kubernetes acts on
``/livez``, while systemd (``Restart=on-failure``) and Compose (``restart: unless-stopped``) restart only a process
that exits. What it held stays pending in Redis: peers claim it, or the worker re-reads it when restarted.

The HTTP server answers ``/healthz`` (readiness: 200 when the heartbeat is fresh and the worker serves, "ok" or
"draining"; 503 while starting or once stale; JSON body), ``/livez`` (liveness: as ``/healthz``, but also 200 while a
fresh beat says "starting", and while the worker is waiting for an unreachable Redis, since restarting it cannot bring
Redis back and a restarted worker reloads its model and loops in back-off once Redis returns) and ``/metrics``
(Prometheus text from the worker's ``Metrics``). ``lineinspect check`` reads the Redis keys instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from pipeline.metrics import Metrics
from pipeline.streams import StreamClient, health_key

logger = logging.getLogger(__name__)

# Exit status of a worker that ended itself because a step hung (1: gave up on Redis, 2: bad configuration, which
# supervisors do not restart): deploy/'s units and Compose restart it
HUNG_EXIT_STATUS = 3
HUNG_REPORT_WAIT_S = 5.0  # how long a worker ending itself for a hung step waits for its critical log to be written


class Heartbeat:
    """Tracks when the worker loop last made progress and mirrors it to ``P:health:<role>:<name>`` in Redis."""

    def __init__(self, client: StreamClient, prefix: str, role: str, name: str, ttl_s: float = 15.0) -> None:
        self.client = client
        self.key = health_key(prefix, role, name)
        self.ttl_s = ttl_s
        self.status: dict[str, Any] = {"role": role, "name": name, "host": socket.gethostname(), "pid": os.getpid()}
        self.state = "starting"
        self.last_beat = time.monotonic()
        self._last_write = 0.0
        self._busy: dict[str, Any] = {}  # fields of a refresh during a long step, shown until the next beat
        self._lock = threading.Lock()  # the state, for the loop, the keeper and /healthz
        self._writing = threading.Lock()  # one write to Redis at a time, in the order their statuses are built
        self._stopped = False
        self.exit_process: Callable[[int], object] = os._exit  # in-process tests replace it
        self.exit_status: int | None = None  # set once exit_if_hung has ended (or asked to end) the process

    def beat(self, state: str = "ok", force: bool = False, **fields: Any) -> None:
        """Record progress; writes to Redis at most once a second (always when ``force``). Nothing once stopped."""
        with self._lock:
            if self._stopped:
                return
            self.state = state
            self.status.update(fields)
            self._busy = {}
        self._record(force)

    def refresh(self, force: bool = False, **busy_fields: Any) -> None:
        """Beat for a loop that is busy on one long step, from another thread: the state stays what the loop last
        beat, and ``busy_fields`` (e.g. how long the step has taken) are shown until its next ``beat``."""
        with self._lock:
            self._busy = busy_fields
        self._record(force)

    def _record(self, force: bool) -> None:
        with self._lock:
            self.last_beat = time.monotonic()
            if not force and self.last_beat - self._last_write < 1.0:
                return
        self._write()

    def _write(self) -> None:
        """Write the status as it is now. One write at a time, its status built once the previous has landed, so an
        older status never overwrites a newer one; a write that lands after ``clear`` gave up waiting for it removes
        the key again."""
        with self._writing:
            with self._lock:
                if self._stopped:
                    return
                self._last_write = time.monotonic()
                status = {**self.status, **self._busy, "state": self.state, "updated_at": time.time()}
            self.client.write_health(self.key, status, self.ttl_s)
            with self._lock:
                stopped_meanwhile = self._stopped
            if stopped_meanwhile:
                self._delete()

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """Ready: the worker serves ("ok", or "draining" what it holds) and has beaten within the TTL."""
        return self._fresh_in("ok", "draining")

    def _fresh_in(self, *states: str) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            age_s = time.monotonic() - self.last_beat
            ok = self.state in states and age_s < self.ttl_s
            return ok, {**self.status, **self._busy, "state": self.state, "seconds_since_beat": round(age_s, 3)}

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """``healthy()``, or starting (a fresh "starting" beat: ``StartingBeat`` keeps it so up to its bound), or
        waiting for Redis: the loop stopped beating because a Redis call is retrying through an outage, and its last
        attempt is recent (attempts come at least every ``redis.reconnect_max_backoff_s``)."""
        ok, status = self._fresh_in("ok", "draining", "starting")
        since, last_attempt = self.client.unreachable_since, self.client.last_attempt_at
        if since is None or last_attempt is None:
            return ok, status
        now = time.monotonic()
        waiting = now - last_attempt < self.ttl_s + self.client.max_backoff_s
        return ok or waiting, {**status, "redis_unreachable_s": round(now - since, 3)}

    def exit_if_hung(self, what: str, **details: Any) -> bool:
        """For a watchdog that has taken a step for hung and finds it still running: once ``alive()`` says the worker
        is not (no fresh beat, not waiting for Redis), log it critical (``what`` hung, ``details``, every thread's
        stack; waiting up to ``HUNG_REPORT_WAIT_S`` for the log to be written) and end the process at once with
        ``HUNG_EXIT_STATUS`` (the hung thread cannot be unwound), so that any supervisor restarts it. Entries in
        hand are left pending in Redis, as a killed worker's are. Returns whether it has ended the process (only
        once); False while the worker is still alive."""
        alive, status = self.alive()
        with self._lock:
            if alive or self.exit_status is not None or self._stopped:
                return self.exit_status is not None
            self.exit_status = HUNG_EXIT_STATUS
        extra = {"hung": what, **details, "health": status, "exit_status": HUNG_EXIT_STATUS, "threads": thread_stacks()}

        def report() -> None:
            logger.critical(
                f"{what} is hung: exiting with status {HUNG_EXIT_STATUS} so that the supervisor restarts the worker; "
                "what it held stays pending in Redis for a peer's claims or its restart",
                extra=extra,
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()

        # Reported from another thread, waited for up to HUNG_REPORT_WAIT_S: a log stream that blocks (a full pipe
        # nobody reads, journald or a container's log driver stalled; maybe what hung the worker, holding the
        # handler's lock mid-write) must not keep the process from exiting
        reporter = threading.Thread(target=report, name="hung-report", daemon=True)
        reporter.start()
        reporter.join(HUNG_REPORT_WAIT_S)
        self.exit_process(HUNG_EXIT_STATUS)
        return True

    def stop(self) -> None:
        """The worker has stopped: /healthz turns 503 and nothing more is written to Redis (the key expires)."""
        with self._lock:
            self.state = "stopped"
            self._stopped = True

    def clear(self, wait_s: float = 1.0) -> None:
        """``stop``, then remove the key, once a write in flight (from another thread) has landed: waiting up to
        ``wait_s`` for it, else it removes the key itself when it lands, if the process still runs then (a write
        already sent lands even after the process has exited: wait one Redis attempt's socket timeout to cover it)."""
        self.stop()
        if self._writing.acquire(timeout=wait_s):
            try:
                self._delete()
            finally:
                self._writing.release()
        else:
            logger.debug("a heartbeat write is in flight; it removes the key when it lands", extra={"key": self.key})

    def _delete(self) -> None:
        try:
            self.client.redis.delete(self.key)
        except Exception:  # best effort at exit; the key expires anyway
            logger.debug("could not delete health key", extra={"key": self.key})


def thread_stacks(frames_per_thread: int = 8) -> dict[str, list[str]]:
    """Where each thread of the process is now: its innermost ``frames_per_thread`` frames, innermost last."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return {
        f"{names.get(ident, 'unknown')} ({ident})": [
            f"{frame.filename}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_stack(stack)[-frames_per_thread:]
        ]
        for ident, stack in sys._current_frames().items()
    }


class StartingBeat:
    """A context manager that keeps the "starting" beat fresh from its own thread while the block runs (a scorer
    loading its model: a big model, a slow disk), for up to ``max_s``: the worker is alive (``/livez`` 200) and
    shown starting in Redis, not ready (``/healthz`` 503). Past ``max_s`` the start is taken for hung: the beats
    stop, so ``/livez`` turns 503 and the key expires a TTL later (a load that ends before then beats again); a load
    still running then ends the process (``Heartbeat.exit_if_hung``)."""

    def __init__(self, heartbeat: Heartbeat, max_s: float, **fields: Any) -> None:
        """``fields`` (e.g. the model directory being loaded) are shown with the "starting" beats, not after."""
        if max_s <= 0:
            msg = f"max_s must be > 0 (worker.max_startup_s), got {max_s}"
            raise ValueError(msg)
        self.heartbeat, self.max_s, self.fields = heartbeat, max_s, fields
        self.interval_s = heartbeat.ttl_s / 3.0
        self._started = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keep-starting", daemon=True)

    def __enter__(self) -> StartingBeat:
        self._started = time.monotonic()
        self.heartbeat.beat("starting")
        self.heartbeat.refresh(force=True, **self.fields, starting_s=0.0)
        self._thread.start()
        return self

    def show(self, **fields: Any) -> None:
        """Show ``fields`` with the "starting" beats from now on (e.g. another model directory being loaded)."""
        self.fields = {**self.fields, **fields}  # a new dict: the beating thread may be reading the old one
        self.heartbeat.refresh(force=True, **self.fields, starting_s=round(time.monotonic() - self._started, 1))

    def _run(self) -> None:
        taken_for_hung = False
        while not self._closed.wait(self.interval_s):
            starting_s = time.monotonic() - self._started
            if starting_s > self.max_s and taken_for_hung:
                details = {"starting_s": round(starting_s, 1), "max_s": self.max_s, **self.fields}
                if self.heartbeat.exit_if_hung("the start (worker.max_startup_s)", **details):
                    return
                continue
            if starting_s > self.max_s:
                logger.error(
                    "still starting after worker.max_startup_s: taken for hung, the heartbeat stops (/livez turns "
                    "503 and the health key expires, then the worker exits); raise worker.max_startup_s if loading "
                    "is only slow",
                    extra={"starting_s": round(starting_s, 1), "max_s": self.max_s, **self.fields},
                )
                taken_for_hung = True
                continue
            try:
                self.heartbeat.refresh(**self.fields, starting_s=round(starting_s, 1))
            except Exception as error:  # an outage past the drain deadline, or a Redis error: try again next round
                logger.warning("could not beat 'starting'", extra={"error": str(error)[:500]})

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._closed.set()  # a write in flight (Redis slow) is left to finish: the thread is a daemon
        self._thread.join(timeout=1.0)


class HealthServer:
    """``/healthz``, ``/livez`` and ``/metrics`` on ``port`` (0 picks a free one), in a daemon thread."""

    def __init__(self, heartbeat: Heartbeat, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
        handler = _make_handler(heartbeat, metrics)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="health-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(heartbeat: Heartbeat, metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/healthz"):
                self._status(*heartbeat.healthy())
            elif self.path.startswith("/livez"):
                self._status(*heartbeat.alive())
            elif self.path.startswith("/metrics"):
                self._reply(200, "text/plain; version=0.0.4", metrics.render())
            else:
                self._reply(404, "text/plain", b"not found: try /healthz, /livez or /metrics\n")

        def _status(self, ok: bool, status: dict[str, Any]) -> None:
            self._reply(200 if ok else 503, "application/json", json.dumps(status).encode())

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
            return

    return Handler
