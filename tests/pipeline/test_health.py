"""Heartbeat writes a TTL'd key; HealthServer answers /healthz (200/503), /livez and /metrics."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from pipeline.config import Config, RedisSettings, StreamSettings
from pipeline.health import HealthServer, Heartbeat
from pipeline.metrics import Metrics
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import StreamClient


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
