"""Heartbeat writes a TTL'd key; HealthServer answers /healthz (200/503) and /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from pipeline.config import Config
from pipeline.health import HealthServer, Heartbeat
from pipeline.metrics import Metrics
from pipeline.streams import StreamClient


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def client(config: Config) -> StreamClient:
    return StreamClient(config.redis.url or "", config.redis, config.streams)


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
