"""Heartbeat writes a TTL'd key; HealthServer answers /healthz (200/503), /livez and /metrics."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from pipeline.config import Config, RedisSettings, StreamSettings
from pipeline.health import HUNG_EXIT_STATUS, HUNG_REPORT_WAIT_S, HealthServer, Heartbeat
from pipeline.metrics import Metrics
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import StreamClient, health_key


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_follows_the_heartbeat_state(client: StreamClient, config: Config) -> None:
    heartbeat = Heartbeat(client, config.streams.prefix, "score", "w1", ttl_s=30)
    metrics = Metrics()
    metrics.worker_up.labels("score", "w1").set(1)
    server = HealthServer(heartbeat, metrics, port=0, host="127.0.0.1").start()
    try:
        heartbeat.beat("ok", force=True, model_id="abc")
        code, body = get(f"http://127.0.0.1:{server.port}/healthz")
        assert code == 200
        assert json.loads(body)["model_id"] == "abc"
        assert client.read_health(config.streams.prefix)[0]["state"] == "ok"
        heartbeat.beat("failed", force=True)
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 503
        code, body = get(f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200
        assert b'lineinspect_worker_up{name="w1",role="score"} 1.0' in body
        heartbeat.clear()
        assert client.read_health(config.streams.prefix) == []
    finally:
        server.stop()


def test_a_worker_waiting_for_redis_is_alive_but_not_ready() -> None:
    # /healthz went 503 on every worker ~15 s into an outage, and Kubernetes' liveness probe on it restarted every
    # pod: restarting cannot bring Redis back, and the restarted pods reloaded their models and looped in back-off
    settings = RedisSettings(connect_timeout_s=0.2, reconnect_max_backoff_s=0.1)
    with EmbeddedRedis(persistent=True) as redis_server:
        client = StreamClient(redis_server.url, settings, StreamSettings())
        heartbeat = Heartbeat(client, "health-test", "score", "w1", ttl_s=0.5)
        server = HealthServer(heartbeat, Metrics(), port=0, host="127.0.0.1").start()
        try:
            heartbeat.beat("ok", force=True)
            redis_server.stop(kill=True)
            publisher = threading.Thread(target=client.publish, args=("s", b"during"))
            publisher.start()  # the worker's loop, stuck in retries: it beats no more
            time.sleep(1.0)  # past the heartbeat's ttl
            assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 503  # not ready: take it out of service
            code, body = get(f"http://127.0.0.1:{server.port}/livez")
            assert code == 200 and json.loads(body)["redis_unreachable_s"] >= 0.9  # alive: do not restart it
            redis_server.start()
            publisher.join(timeout=10)
            assert not publisher.is_alive() and client.unreachable_since is None
            assert get(f"http://127.0.0.1:{server.port}/livez")[0] == 503  # Redis is back, yet the loop is silent
            heartbeat.beat("ok")
            assert get(f"http://127.0.0.1:{server.port}/livez")[0] == get(f"http://127.0.0.1:{server.port}/healthz")[0]
        finally:
            server.stop()
            client.close()


def test_a_refresh_keeps_the_state_and_shows_its_fields_until_the_next_beat(
    client: StreamClient, config: Config
) -> None:
    # InHand refreshes the beat of a worker busy on a long batch from its own thread: the state (here "draining")
    # must stay the loop's, and the busy fields must not outlive the batch
    heartbeat = Heartbeat(client, config.streams.prefix, "score", "w1", ttl_s=30)
    heartbeat.beat("draining", force=True)
    time.sleep(1.05)  # Redis is written at most once a second
    heartbeat.refresh(in_hand=8, busy_s=20.0)
    healthy, status = heartbeat.healthy()
    assert healthy and (status["state"], status["in_hand"]) == ("draining", 8)
    written = client.read_health(config.streams.prefix)[0]
    assert (written["state"], written["in_hand"], written["busy_s"]) == ("draining", 8, 20.0)
    heartbeat.beat("ok", force=True)
    assert "in_hand" not in heartbeat.healthy()[1] and "in_hand" not in client.read_health(config.streams.prefix)[0]
    heartbeat.clear()


class HeldWrites(StreamClient):
    """A real StreamClient whose heartbeat writes carrying ``in_hand`` (a keeper's refresh) wait, once built, until
    ``release`` is set: the refresh's SET is in flight while the worker's own thread goes on."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.redis.url or "", config.redis, config.streams)
        self.entered, self.release = threading.Event(), threading.Event()

    def write_health(self, key: str, status: dict[str, object], ttl_s: float) -> None:
        if "in_hand" in status:
            self.entered.set()
            assert self.release.wait(timeout=30), "the test never released the held write"
        super().write_health(key, status, ttl_s)


def _refresh_in_flight(config: Config) -> tuple[HeldWrites, Heartbeat, threading.Thread]:
    client = HeldWrites(config)
    heartbeat = Heartbeat(client, config.streams.prefix, "sink", "w1", ttl_s=30)
    keeper = threading.Thread(target=heartbeat.refresh, kwargs={"in_hand": 4, "busy_s": 20.0}, daemon=True)
    keeper.start()  # the keeper thread's beat: built with the state of the moment, then held on its way to Redis
    assert client.entered.wait(timeout=10)
    return client, heartbeat, keeper


def test_a_keepers_beat_in_flight_never_lands_after_the_loops_newer_one(config: Config) -> None:
    # The keeper thread (InHand) built its status, then the loop beat "draining" (forced) and its SET went first: the
    # keeper's older one overwrote it, so Redis showed the draining worker as it was before (here "starting", with the
    # refresh's in_hand) until the next beat.
    client, heartbeat, keeper = _refresh_in_flight(config)
    try:
        loop = threading.Thread(target=heartbeat.beat, args=("draining",), kwargs={"force": True}, daemon=True)
        loop.start()
        loop.join(timeout=1.0)  # unserialised, its write lands now; serialised, it waits behind the keeper's
        client.release.set()
        keeper.join(timeout=10)
        loop.join(timeout=10)
        assert not keeper.is_alive() and not loop.is_alive()
        (written,) = client.read_health(config.streams.prefix)
        assert written["state"] == "draining" and "in_hand" not in written
    finally:
        client.release.set()
        client.redis.delete(heartbeat.key)
        client.close()


def test_a_beat_in_flight_at_stop_does_not_bring_the_key_back(config: Config) -> None:
    # A keeper's write still on its way (Redis slow) when the worker stopped and deleted its key landed after the
    # delete: `lineinspect check` then saw the stopped worker healthy for the key's whole TTL.
    client, heartbeat, keeper = _refresh_in_flight(config)
    try:
        heartbeat.clear(wait_s=0.0)
        assert not heartbeat.healthy()[0]
        client.release.set()
        keeper.join(timeout=10)
        assert not keeper.is_alive()
        assert client.read_health(config.streams.prefix) == []
        heartbeat.beat("ok", force=True)  # nothing is written, nor made healthy again, once stopped
        assert client.read_health(config.streams.prefix) == [] and not heartbeat.healthy()[0]
    finally:
        client.release.set()
        client.redis.delete(heartbeat.key)
        client.close()


class Recording(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_hung_worker_exits_even_when_its_log_stream_blocks(client: StreamClient, config: Config) -> None:
    # exit_if_hung logged its critical line, then exited: with the log stream blocked (a full pipe nobody reads, a
    # stalled journald or container log driver), a thread stuck mid-write holds the handler's lock, and the watchdog
    # waited on it for good, so the hung worker never exited. Here this test's thread holds that lock.
    heartbeat = Heartbeat(client, config.streams.prefix, "score", "w1", ttl_s=0.2)
    exits: list[int] = []
    heartbeat.exit_process = exits.append
    handler = Recording()
    root = logging.getLogger()
    root.addHandler(handler)
    handler.acquire()
    try:
        time.sleep(0.3)  # no beat for longer than the TTL: not alive
        watchdog = threading.Thread(target=heartbeat.exit_if_hung, args=("a step",), daemon=True)
        watchdog.start()
        watchdog.join(HUNG_REPORT_WAIT_S + 10.0)  # a hang guard: before, it never returned
        assert exits == [HUNG_EXIT_STATUS]
        assert not handler.records  # the log stream is still blocked
    finally:
        handler.release()
    deadline = time.monotonic() + 10.0
    while not handler.records and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = handler.records  # written once the stream moves (in a real process, only if before the exit)
    root.removeHandler(handler)
    assert record.levelno == logging.CRITICAL and record.__dict__["hung"] == "a step"


def test_a_key_among_the_heartbeats_that_is_not_one_is_skipped(redis_url: str, stream_prefix: str) -> None:
    # one non-JSON value under P:health:*:* broke `lineinspect check`, forget-line and run's wait for its workers
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))
    client.write_health(health_key(stream_prefix, "score", "w1"), {"role": "score", "name": "w1", "state": "ok"}, 30)
    client.redis.set(health_key(stream_prefix, "score", "model"), "/models/v1", px=30_000)
    client.redis.set(health_key(stream_prefix, "sink", "list"), "[1, 2]", px=30_000)
    assert [status["name"] for status in client.read_health(stream_prefix)] == ["w1"]
