"""End to end with separate processes and a real redis-server: kill -9 a scoring worker, restart Redis.

Both check the at-least-once + idempotent-sink promise: every frame gets exactly one published decision.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pipeline.codec import decode_decision
from pipeline.config import RedisSettings, StreamSettings
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import SCORER_GROUP, LineKeys, StreamClient
from tests.workers.conftest import TinyLine
from tests.workers.helpers import frame_from_file, publish_frames, wait_until
from tests.workers.processes import WorkerProcesses, worker_env

pytestmark = pytest.mark.slow


def published_frame_ids(client: StreamClient, keys: LineKeys) -> list[str]:
    return [decode_decision(e.payload).frame_id for e in client.read_range(keys.decisions, "0-0", 100_000) if e.payload]


def test_killed_scoring_worker_frames_get_exactly_one_decision(
    tiny_line: TinyLine, redis_url: str, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    processes.env = worker_env(redis_url, stream_prefix, tmp_path)
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))
    keys = LineKeys(stream_prefix, "line-1")
    frames = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(120)]
    client.ensure_group(keys.frames, SCORER_GROUP)
    publish_frames(client, keys, frames)
    processes.start("sink", "--line", "line-1", "--name", "sink-1")
    victim = processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir))

    def victim_holds_frames() -> bool:
        return bool(client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 100, consumername="a"))

    wait_until(victim_holds_frames, timeout_s=120, what="worker a to take a batch")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    held = client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 100, consumername="a")
    assert held, "worker a was killed while holding frames"
    processes.start("score-worker", "--line", "line-1", "--name", "b", "--model", str(tiny_line.model_dir))

    wait_until(
        lambda: len(published_frame_ids(client, keys)) >= len(frames),
        timeout_s=180,
        what=f"all decisions\n{processes.logs()}",
    )
    wait_until(lambda: client.group_stats(keys.results)["sinks"].pending == 0, what="sink to settle")
    published = published_frame_ids(client, keys)
    assert sorted(published) == sorted(frame.frame_id for frame in frames)
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
    assert client.dead_letters(keys) == []


def test_workers_ride_out_a_redis_restart_without_losing_acknowledged_frames(
    tiny_line: TinyLine, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    with EmbeddedRedis(persistent=True) as server:
        processes.env = worker_env(server.url, stream_prefix, tmp_path)
        client = StreamClient(
            server.url, RedisSettings(reconnect_max_backoff_s=0.5), StreamSettings(prefix=stream_prefix)
        )
        keys = LineKeys(stream_prefix, "line-1")
        processes.start("sink", "--line", "line-1", "--name", "sink-1")
        processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir))
        first = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(20)]
        publish_frames(client, keys, first)
        wait_until(
            lambda: len(published_frame_ids(client, keys)) >= 20,
            timeout_s=120,
            what=f"first decisions\n{processes.logs()}",
        )
        in_flight = [frame_from_file(tiny_line.defect_images[i % 4]) for i in range(20)]
        publish_frames(client, keys, in_flight)
        server.restart(down_s=1.5)
        after = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(20)]
        publish_frames(client, keys, after)
        everything = first + in_flight + after
        wait_until(
            lambda: len(published_frame_ids(client, keys)) >= len(everything),
            timeout_s=120,
            what=f"decisions after the restart\n{processes.logs()}",
        )
        assert sorted(published_frame_ids(client, keys)) == sorted(frame.frame_id for frame in everything)
        assert all(process.poll() is None for process in processes.processes), "a worker died on the restart"
        processes.stop_all()
        client.close()


def test_sigterm_drains_the_frames_in_hand_before_exiting(
    tiny_line: TinyLine, redis_url: str, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    processes.env = worker_env(redis_url, stream_prefix, tmp_path, LINEINSPECT__STREAMS__CLAIM_IDLE_MS="600000")
    client = StreamClient(redis_url, RedisSettings(), StreamSettings(prefix=stream_prefix))
    keys = LineKeys(stream_prefix, "line-1")
    frames = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(200)]
    client.ensure_group(keys.frames, SCORER_GROUP)
    publish_frames(client, keys, frames)
    worker = processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir))

    def worker_holds_frames() -> bool:
        return bool(client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 100, consumername="a"))

    wait_until(worker_holds_frames, timeout_s=120, what="worker a to take a batch")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 100, consumername="a") == []
    scored = client.length(keys.results)
    assert 0 < scored < len(frames)  # stopped early, yet everything it took was finished and acknowledged


def test_a_worker_told_to_stop_during_a_redis_outage_exits_within_its_drain_timeout(
    tiny_line: TinyLine, stream_prefix: str, tmp_path: Path, processes: WorkerProcesses
) -> None:
    # systemd / Kubernetes stop workers with SIGTERM and SIGKILL them after a grace period; a worker that retried an
    # unreachable Redis until it came back never exited on its own. Now it gives up after worker.drain_timeout_s,
    # with a one-line error and exit 1 (what it held stays pending for redelivery).
    with EmbeddedRedis() as server:
        processes.env = worker_env(server.url, stream_prefix, tmp_path, LINEINSPECT__WORKER__DRAIN_TIMEOUT_S="2")
        client = StreamClient(server.url, RedisSettings(), StreamSettings(prefix=stream_prefix))
        workers = [
            processes.start("sink", "--line", "line-1", "--name", "sink-1"),
            processes.start("score-worker", "--line", "line-1", "--name", "a", "--model", str(tiny_line.model_dir)),
        ]

        def both_running() -> bool:
            return {(s["role"], s["state"]) for s in client.read_health(stream_prefix)} >= {
                ("sink", "ok"),
                ("score", "ok"),
            }

        wait_until(both_running, timeout_s=120, what=f"workers to start\n{processes.logs()}")
        client.close()
        server.stop()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=60) for worker in workers]  # a hang guard: before the fix they never exited
    assert codes == [1, 1], processes.logs()
    assert "redis unreachable, exiting" in processes.logs()
