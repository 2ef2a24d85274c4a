"""WorkerRuntime: what every worker exports about its Redis, and its health key at exit, against real ones (a
closed port, a stalled server)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.config import Config, config_from_mapping, load_config
from pipeline.redis_server import EmbeddedRedis, free_port
from pipeline.streams import StreamClient, StreamsUnavailable
from tests.workers.processes import REPO_ROOT
from workers.lifecycle import WorkerRuntime, keeper_join_s, stop_bound_s


def test_every_worker_exports_whether_its_redis_answers(config: Config) -> None:
    # During an outage the workers' loops wait in retries and their heartbeats stop: redis_up says why.
    closed_port = f"redis://127.0.0.1:{free_port()}/0"
    with WorkerRuntime(config, config.redis.url or "", "score", "a", port=0) as reachable:
        assert reachable.metrics.registry.get_sample_value("lineinspect_redis_up") == 1
    with WorkerRuntime(config, closed_port, "score", "b", port=0) as unreachable:
        assert unreachable.metrics.registry.get_sample_value("lineinspect_redis_up") == 0


def test_a_worker_giving_up_on_a_hung_redis_exits_without_waiting_on_it_again(config: Config) -> None:
    # A worker told to stop during an outage gives up within its grace period (StreamsUnavailable); deleting its
    # heartbeat key on the way out then waited a whole socket timeout more (5.2 s by default) on the Redis it had
    # just given up on, past the supervisor's grace. The key expires by itself (its TTL).
    with socket.socket() as silent:  # accepts connections, never answers: a hung Redis
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = config.model_copy(update={"redis": config.redis.model_copy(update={"connect_timeout_s": 3.0})})
        started = time.monotonic()
        with pytest.raises(StreamsUnavailable), WorkerRuntime(settings, url, "score", "a", port=0):
            started = time.monotonic()
            raise StreamsUnavailable(f"redis at {url} unreachable during read_new")
        assert time.monotonic() - started < 1.5  # the health server's own stop takes up to 0.5 s


def exit_with_a_beat_in_flight() -> None:
    """A worker process (run by the test below) that stops and exits while a beat from another thread (a keeper's) is
    on its way to a Redis the parent has stalled once the worker printed "ready"."""
    config = load_config()
    with WorkerRuntime(config, config.redis.url or "", "score", "w1", port=0) as runtime:
        runtime.heartbeat.beat("ok", force=True)
        print("ready", flush=True)
        sys.stdin.readline()  # Redis is stalled now
        threading.Thread(target=runtime.heartbeat.beat, args=("ok",), kwargs={"force": True}, daemon=True).start()
        time.sleep(0.5)  # its SET is sent and waits for Redis
        runtime.stop.set()


def test_a_beat_in_flight_when_the_worker_exits_does_not_outlive_it(config: Config) -> None:
    # clear() waited 1 s for a write in flight, then the process exited: the write, already sent, landed once Redis
    # answered again, and the stopped worker's key read "ok" for its whole TTL (15 s). Redis stalled for 3 s here
    # (SIGSTOP: it takes connections and commands meanwhile, and runs them when continued, as after a fork or fsync
    # stall), within one socket timeout (redis.connect_timeout_s + streams.block_ms).
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LINEINSPECT__STREAMS__PREFIX": prefix}
    with EmbeddedRedis() as server:
        client = StreamClient(server.url, config.redis, config.streams)
        redis_pid = int(client.redis.info("server")["process_id"])
        code = "from tests.workers.test_lifecycle import exit_with_a_beat_in_flight; exit_with_a_beat_in_flight()"
        worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env={**env, "REDIS_URL": server.url},
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert worker.stdout is not None and worker.stdin is not None
            assert worker.stdout.readline() == b"ready\n"
            os.kill(redis_pid, signal.SIGSTOP)
            try:
                worker.stdin.write(b"stalled\n")
                worker.stdin.flush()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=3.0)  # gone before Redis answers: its write lands later
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            assert worker.wait(timeout=30) == 0
            assert client.ping()
            time.sleep(0.2)  # a write sent before the ping has run by now
            assert client.read_health(prefix) == []
        finally:
            worker.kill()
            worker.wait()
            client.close()


def test_a_stopping_worker_waits_one_redis_attempt_and_its_stop_bound_counts_it(config: Config) -> None:
    # WorkerRuntime re-derived StreamClient's socket timeout (connect_timeout_s + block_ms) for its exit wait, and the
    # deploy tests a third time for the stop bound: changing one left the others waiting by the old formula.
    data = config.model_dump(mode="json")
    data["redis"]["connect_timeout_s"] = 2.5
    data["streams"]["block_ms"] = 300
    settings = config_from_mapping(data)
    with WorkerRuntime(settings, settings.redis.url or "", "score", "a", port=0) as runtime:
        socket_timeout_s = runtime.client.redis.connection_pool.connection_kwargs["socket_timeout"]
        assert runtime.client.attempt_timeout_s == socket_timeout_s == pytest.approx(2.8)
        assert runtime.exit_wait_s == socket_timeout_s
    drain_s = settings.worker.drain_timeout_s
    assert stop_bound_s(settings) == pytest.approx(drain_s + keeper_join_s(settings) + socket_timeout_s)
