"""A consumer group's lag on a line that trims frames no scorer has read: a number, at most the frames the stream holds.

Redis 7.0 keeps counting a group's reads (``entries-read``) one by one across a trim, so XINFO GROUPS' ``lag`` also
counts every entry trimmed before the group read it, for good (redis/redis issue 13957; pull 13473 fixed only the
moment before the next read). The chaos soak at ``streams.maxlen`` 300 and 250 frames/s saw lag 10,020 with at most
~400 frames in the stream: ``lineinspect_stream_lag``, KEDA's ``lagCount`` and the saturation alerts read that.
"""

from __future__ import annotations

import pytest

from pipeline.config import RedisSettings, StreamSettings
from pipeline.streams import SCORER_GROUP, SINK_GROUP, Commit, LineKeys, StreamClient, trimmed_unread_key


@pytest.fixture(autouse=True)
def _redis_reports_a_lag(client: StreamClient) -> None:
    if int(client.redis.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("Redis before 7 reports no lag")


def redis_lag(client: StreamClient, keys: LineKeys) -> int:
    """The lag as Redis reports it (``group_stats`` sets it right first)."""
    (row,) = [row for row in client.redis.xinfo_groups(keys.frames) if row["name"] in (SCORER_GROUP, b"scorers")]
    return int(row["lag"])


def test_frames_trimmed_before_the_scorers_read_them_do_not_count_in_the_lag(
    client: StreamClient, keys: LineKeys
) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    client.publish(keys.frames, b"frame-0")
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    for index in range(1, 11):  # a producer outrunning the scorers: each XADD trims the stream to 3 entries
        client.redis.xadd(keys.frames, {"payload": f"frame-{index}".encode()}, maxlen=3, approximate=False)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 3  # Redis 7.0 alone: 10
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    assert redis_lag(client, keys) == 2  # set right in Redis too, and counted on from there by Redis itself
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 2
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 0


def test_a_lag_above_the_stream_length_is_cut_to_it_when_the_group_is_inside_the_stream(
    client: StreamClient, keys: LineKeys
) -> None:
    # Trimmed past the group and read on before anything set it right: how many of the stream's entries the group has
    # read is not known without reading them, so the lag becomes the stream's length, an upper bound (a producer
    # holding back on it never publishes more than the line can take), and 0 once the group has read everything.
    client.ensure_group(keys.frames, SCORER_GROUP)
    client.publish(keys.frames, b"frame-0")
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    for index in range(1, 11):
        client.redis.xadd(keys.frames, {"payload": f"frame-{index}".encode()}, maxlen=3, approximate=False)
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    # Redis 7.0 reports lag 9 here; 2 are undelivered
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 3
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 0


def test_a_lag_redis_cannot_tell_on_a_trimmed_stream_becomes_the_stream_length(
    client: StreamClient, keys: LineKeys
) -> None:
    # A Redis restart can leave the read counter unknown (the soak after restarts at maxlen 300); on a trimmed stream
    # Redis cannot estimate it while the group is inside the stream and reports no lag at all (nil) until the group
    # has read everything: camera software holding back on the lag, KEDA and lineinspect_stream_lag had no number.
    client.ensure_group(keys.frames, SCORER_GROUP)
    for index in range(10):
        client.redis.xadd(keys.frames, {"payload": f"frame-{index}".encode()}, maxlen=8, approximate=False)
    read = client.read_new(keys.frames, SCORER_GROUP, "score-a", count=3, block_ms=None)
    client.redis.execute_command("XGROUP", "SETID", keys.frames, SCORER_GROUP, read[-1].entry_id)  # counter lost
    assert client.redis.xinfo_groups(keys.frames)[0]["lag"] is None
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 8  # an upper bound: 5 are undelivered
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=2, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 6
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 0


def test_the_sinks_lag_on_the_results_stream_is_not_set_from_its_length_while_deletions_hide_it(
    client: StreamClient, keys: LineKeys
) -> None:
    # The sink deletes results once acknowledged; while one it read earlier is still pending (a heatmap in flight)
    # behind the last one deleted, Redis reports no lag (deleted entries ahead) though its read counter is right.
    # Setting that counter from the stream's length counted the pending results as undelivered, for good.
    client.ensure_group(keys.results, SINK_GROUP)
    ids = [client.publish(keys.results, f"result-{index}".encode()) for index in range(10)]
    client.read_new(keys.results, SINK_GROUP, "sink", count=8, block_ms=None)
    published = Commit(acks=[*ids[1:6], ids[7]], delete_acked=True)  # ids[0] and ids[6] wait for their heatmaps
    client.commit(keys.results, SINK_GROUP, published, keys.deadletter)
    assert client.group_stats(keys.results)[SINK_GROUP].lag is None  # as Redis reports it: unknown
    for index in range(10, 14):
        client.publish(keys.results, f"result-{index}".encode())
    client.read_new(keys.results, SINK_GROUP, "sink", count=2, block_ms=None)
    assert client.group_stats(keys.results)[SINK_GROUP].lag == 4  # results 10 to 13


def outrun(client: StreamClient, keys: LineKeys, count: int, keep: int = 3) -> None:
    """A producer outrunning the scorers: ``count`` frames, each XADD trimming the stream to ``keep`` entries."""
    for index in range(count):
        client.redis.xadd(keys.frames, {"payload": f"frame-{index}".encode()}, maxlen=keep, approximate=False)


def test_frames_trimmed_before_the_scorers_read_them_are_counted_once(client: StreamClient, keys: LineKeys) -> None:
    # They get no decision and no dead letter; only the lag, for a moment, showed them (lineinspect_stream_lag near
    # streams.maxlen). Redis counts them in the lag until group_stats sets it right: that correction is the count.
    client.ensure_group(keys.frames, SCORER_GROUP)
    assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 0
    client.publish(keys.frames, b"frame-0")
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    outrun(client, keys, 10)  # 7 of them trimmed before a scorer read them, 3 wait
    assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 7
    assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 7  # counted once
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 7
    # Trimmed past the group and read on before anything looked: counted as the group catches up.
    outrun(client, keys, 10)
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 3  # an upper bound: 2 wait
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    stats = client.group_stats(keys.frames)[SCORER_GROUP]
    assert (stats.lag, stats.trimmed_unread) == (0, 14)
    other = StreamClient(client.url, RedisSettings(), StreamSettings())  # another process (ingest) sees the same
    assert other.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 14
    other.close()


def test_a_read_counter_a_restart_set_back_is_set_right_without_counting_frames_as_trimmed(
    client: StreamClient, keys: LineKeys
) -> None:
    # Redis 7.0 restarted from its append-only file brings back the read counter of the last rewrite: the lag is too
    # high by the frames read since, none of them trimmed.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(6)]
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=4, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 2
    client.redis.execute_command("XGROUP", "SETID", keys.frames, SCORER_GROUP, ids[3], "ENTRIESREAD", 1)  # stale
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].lag == 4  # too high by 3, not yet known to be wrong
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    stats = client.group_stats(keys.frames)[SCORER_GROUP]
    assert (stats.lag, stats.trimmed_unread) == (0, 0)
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=1, block_ms=None)
    outrun(client, keys, 10)  # frames trimmed after that are counted again
    client.read_new(keys.frames, SCORER_GROUP, "score-a", count=10, block_ms=None)
    assert client.group_stats(keys.frames)[SCORER_GROUP].trimmed_unread == 7


def test_a_stream_nothing_trims_keeps_no_count(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.results, SINK_GROUP)
    ids = [client.publish(keys.results, f"result-{index}".encode()) for index in range(3)]
    client.read_new(keys.results, SINK_GROUP, "sink", count=3, block_ms=None)
    client.commit(keys.results, SINK_GROUP, Commit(acks=ids, delete_acked=True), keys.deadletter)
    assert client.group_stats(keys.results, count_trimmed=False)[SINK_GROUP].trimmed_unread is None
    assert not client.redis.exists(trimmed_unread_key(keys.results))
