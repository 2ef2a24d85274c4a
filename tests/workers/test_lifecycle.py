"""WorkerRuntime: what every worker exports about its Redis, against a real one and a closed port."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import Config
from pipeline.redis_server import free_port
from pipeline.streams import StreamsUnavailable
from workers.lifecycle import WorkerRuntime


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
