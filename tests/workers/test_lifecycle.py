"""WorkerRuntime: what every worker exports about its Redis, against a real one and a closed port."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.redis_server import free_port
from workers.lifecycle import WorkerRuntime


def test_every_worker_exports_whether_its_redis_answers(config: Config) -> None:
    # During an outage the workers' loops wait in retries and their heartbeats stop: redis_up says why.
    closed_port = f"redis://127.0.0.1:{free_port()}/0"
    with WorkerRuntime(config, config.redis.url or "", "score", "a", port=0) as reachable:
        assert reachable.metrics.registry.get_sample_value("lineinspect_redis_up") == 1
    with WorkerRuntime(config, closed_port, "score", "b", port=0) as unreachable:
        assert unreachable.metrics.registry.get_sample_value("lineinspect_redis_up") == 0
