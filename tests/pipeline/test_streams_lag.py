"""A consumer group's lag after a Redis restart: right again as soon as the group has read everything.

Redis 7.0 (Debian 12's 7.0.15, the Redis deploy/README.md names) logs XREADGROUP to the append-only file as XCLAIMs
that do not carry the group's read counter (``entries-read``), so a restart brings back the counter of the last AOF
rewrite and XINFO GROUPS' ``lag`` stays too high by every entry read since, for good (redis/redis pull 12898 changed
the propagation later). The chaos soak (benchmarks/chaos_soak.py) ended with ``lag`` 1574 and nothing undelivered;
ingest holds back while ``lag`` is at ``ingest.live_queue_limit`` (64), so file sources stopped and live cameras
dropped every frame after a restart.
"""

from __future__ import annotations

import time

import pytest

from pipeline.config import RedisSettings, StreamSettings
from pipeline.redis_server import EmbeddedRedis, free_port
from pipeline.streams import SCORER_GROUP, LineKeys, StreamClient


def publish_and_score(client: StreamClient, keys: LineKeys, count: int) -> None:
    """``count`` frames, each read and acknowledged as it comes (the line keeps up)."""
    for index in range(count):
        client.publish(keys.frames, f"frame-{index}".encode())
        entries = client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
        client.ack(keys.frames, SCORER_GROUP, [entry.entry_id for entry in entries])


def rewrite_append_only_file(client: StreamClient) -> None:
    client.redis.bgrewriteaof()
    deadline = time.monotonic() + 30
    while client.redis.info("persistence")["aof_rewrite_in_progress"] or client.redis.info("persistence").get(
        "aof_rewrite_scheduled"
    ):
        assert time.monotonic() < deadline, "the AOF rewrite did not finish"
        time.sleep(0.05)


def lose_read_counter_to_a_restart(server: EmbeddedRedis) -> tuple[StreamClient, LineKeys]:
    """A line whose scorers read 10 frames before an AOF rewrite and 100 after it, then a Redis restart: Redis 7.0
    then reports lag 100 with nothing undelivered."""
    client = StreamClient(server.url, RedisSettings(reconnect_max_backoff_s=0.5), StreamSettings(prefix="lag"))
    if int(client.redis.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("Redis before 7 reports no lag")
    keys = LineKeys("lag", "line-1")
    client.ensure_group(keys.frames, SCORER_GROUP)
    publish_and_score(client, keys, 10)
    rewrite_append_only_file(client)
    publish_and_score(client, keys, 100)
    server.restart()
    return client, keys


def test_a_group_that_has_read_everything_has_lag_0_after_a_redis_restart() -> None:
    with EmbeddedRedis(persistent=True) as server:
        client, keys = lose_read_counter_to_a_restart(server)
        stats = client.group_stats(keys.frames)[SCORER_GROUP]
        assert (stats.pending, stats.lag) == (0, 0)
        assert client.redis.xinfo_groups(keys.frames)[0]["lag"] == 0  # set right in Redis: KEDA and cameras read it
        for index in range(3):
            client.publish(keys.frames, f"waiting-{index}".encode())
        assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 3
        server.restart()  # what this repair wrote survives a restart as the XREADGROUPs do not
        publish_and_score(client, keys, 5)
        assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 0
        client.close()


def test_a_server_refusing_writes_still_reports_its_groups_as_they_are() -> None:
    # a replica or a demoted primary (READONLY; NOREPLICAS under min-replicas-to-write) refuses the repair's XGROUP
    # SETID: the script's error read as "not a stream" and group_stats reported no group at all, so ingest saw no
    # backlog and the sink exported no lag
    with EmbeddedRedis(persistent=True) as server:
        client, keys = lose_read_counter_to_a_restart(server)
        client.redis.set("lag:not-a-stream", "text")
        assert client.group_stats("lag:no-such-key") == {} and client.group_stats("lag:not-a-stream") == {}
        client.redis.replicaof("127.0.0.1", free_port())  # of a primary nobody runs: read-only, its data kept
        stats = client.group_stats(keys.frames)[SCORER_GROUP]
        assert (stats.pending, stats.lag) == (0, 100)  # as Redis has it, not repaired
        client.close()


def test_a_restart_on_a_live_line_at_maxlen_counts_no_frame_as_trimmed_unread() -> None:
    # The frames stream of a running line is always at maxlen. After a Redis 7.0 restart the stale counter puts the
    # lag above the length while a camera keeps publishing, so the counter is set to the estimate "read nothing of
    # what the stream holds" (not counted: the counter was stale). The scorers had read all but the last few of them:
    # when they caught up, that estimate's shortfall (the stream's length less the frames waiting) was counted as
    # frames trimmed before any scorer read them, a critical alert for frames that all got decisions.
    with EmbeddedRedis(persistent=True) as server:
        client = StreamClient(server.url, RedisSettings(reconnect_max_backoff_s=0.5), StreamSettings(prefix="lag"))
        if int(client.redis.info("server")["redis_version"].split(".")[0]) < 7:
            pytest.skip("Redis before 7 reports no lag")
        keys = LineKeys("lag", "line-1")
        client.ensure_group(keys.frames, SCORER_GROUP)

        def publish(count: int, name: str) -> None:
            for index in range(count):
                client.redis.xadd(keys.frames, {"payload": f"{name}-{index}".encode()}, maxlen=20, approximate=False)

        def keep_up(count: int) -> None:  # each frame read as it comes, the sink looking after each
            for index in range(count):
                publish(1, f"kept-{index}")
                entries = client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
                client.ack(keys.frames, SCORER_GROUP, [entry.entry_id for entry in entries])
                assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 0

        keep_up(30)
        rewrite_append_only_file(client)
        keep_up(100)
        server.restart()
        publish(5, "live")  # the camera goes on: 5 frames wait when the sink first looks
        assert client.redis.xinfo_groups(keys.frames)[0]["lag"] > 20  # stale: above the stream's length
        assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 0
        assert len(client.read_new(keys.frames, SCORER_GROUP, "score-a", count=100, block_ms=None)) == 5
        stats = client.group_stats(keys.frames)[SCORER_GROUP]
        assert (stats.lag, stats.trimmed_unread) == (0, 0)
        # frames trimmed before a scorer read them are counted again once the counter is exact
        publish(30, "outrun")  # 10 trimmed before a scorer read them, 20 wait
        client.read_new(keys.frames, SCORER_GROUP, "score-a", count=100, block_ms=None)
        assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 10
        client.close()
