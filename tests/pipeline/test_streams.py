"""StreamClient against a real Redis: delivery, pending re-reads, claims, atomic commit, idempotent publish."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.config import Config, RedisSettings
from pipeline.redis_server import EmbeddedRedis
from pipeline.streams import (
    DEAD_LETTER_PAYLOAD_BYTES,
    SCORER_GROUP,
    SINK_GROUP,
    Commit,
    DeadLetter,
    DecisionToPublish,
    LineKeys,
    Publication,
    StreamClient,
    StreamsUnavailable,
)


def publish_many(client: StreamClient, keys: LineKeys, count: int) -> list[str]:
    return [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(count)]


def test_new_entries_are_delivered_once_across_consumers(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    client.ensure_group(keys.frames, SCORER_GROUP)  # idempotent
    ids = publish_many(client, keys, 5)
    first = client.read_new(keys.frames, SCORER_GROUP, "a", count=3, block_ms=None)
    second = client.read_new(keys.frames, SCORER_GROUP, "b", count=10, block_ms=None)
    assert [entry.entry_id for entry in first + second] == ids
    assert first[0].payload == b"frame-0"
    assert client.read_new(keys.frames, SCORER_GROUP, "a", count=10, block_ms=None) == []


def test_own_pending_is_reread_with_a_rising_delivery_count(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 3)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=3, block_ms=None)
    client.ack(keys.frames, SCORER_GROUP, [ids[0]])
    pending = client.read_own_pending(keys.frames, SCORER_GROUP, "a", count=10)
    assert [entry.entry_id for entry in pending] == ids[1:]
    assert [entry.deliveries for entry in pending] == [2, 2]
    assert client.read_own_pending(keys.frames, SCORER_GROUP, "b", count=10) == []


def test_claim_stale_takes_over_idle_entries_only(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 2)
    client.read_new(keys.frames, SCORER_GROUP, "dead", count=2, block_ms=None)
    assert client.claim_stale(keys.frames, SCORER_GROUP, "alive", 60_000, 10, keys.deadletter).entries == []
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "alive", 0, 10, keys.deadletter).entries
    assert [entry.entry_id for entry in claimed] == ids
    assert all(entry.deliveries == 2 for entry in claimed)
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 2


def test_a_live_workers_entries_trimmed_right_after_it_read_them_are_left_to_it(
    client: StreamClient, keys: LineKeys
) -> None:
    # A producer faster than the scorers trims entries moments after a worker read them. XAUTOCLAIM reported (and
    # dropped from the pending list) trimmed entries whatever their idle time, so a peer's claim dead-lettered, as
    # trimmed, frames the worker was scoring: 24 spurious entry_trimmed dead letters in a minute at 2x capacity.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 5)
    client.read_new(keys.frames, SCORER_GROUP, "busy", count=5, block_ms=None)
    client.redis.xtrim(keys.frames, maxlen=2, approximate=False)
    assert client.claim_stale(keys.frames, SCORER_GROUP, "peer", 60_000, 10, keys.deadletter).dead_letters == []
    assert client.dead_letters(keys) == []
    pending = client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 10, consumername="busy")
    assert [row["message_id"].decode() for row in pending] == ids  # still the owner's, to acknowledge or claim


def test_two_claimers_racing_over_trimmed_entries_report_each_once(config: Config, keys: LineKeys) -> None:
    # Two scorers claiming a dead worker's trimmed frames at the same time: with XPENDING and XCLAIM as two round
    # trips both saw an entry idle, the first XCLAIM dropped it from the pending list and the second then found it
    # gone as well, so about half the frames got two entry_trimmed dead letters.
    clients = [StreamClient(config.redis.url or "", config.redis, config.streams) for _ in range(2)]
    client = clients[0]
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 200)
    client.read_new(keys.frames, SCORER_GROUP, "dead", count=200, block_ms=None)
    client.redis.xtrim(keys.frames, maxlen=0, approximate=False)

    def claim_until_empty(index: int) -> list[str]:
        reported: list[str] = []
        while True:
            claimed = clients[index].claim_stale(keys.frames, SCORER_GROUP, f"c{index}", 0, 5, keys.deadletter)
            assert claimed.entries == []
            if not claimed.dead_letters:
                return reported
            reported.extend(letter.entry_id for letter in claimed.dead_letters)

    with ThreadPoolExecutor(2) as pool:
        reported = [entry_id for found in pool.map(claim_until_empty, range(2)) for entry_id in found]
    for stream_client in clients:
        stream_client.close()
    assert sorted(reported) == sorted(ids)  # every trimmed frame reported, none twice
    assert sorted(letter["source_entry_id"] for letter in client.dead_letters(keys)) == sorted(ids)  # and written once
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_result_acked_and_deleted_while_a_peer_claims_is_not_reported_trimmed(config: Config, keys: LineKeys) -> None:
    # The sink deletes results it acknowledges. A peer sink's claim that listed an entry as idle, then found it gone
    # after the owner acknowledged and deleted it, reported it trimmed: a false entry_trimmed dead letter for a
    # result whose decision had been published.
    owner, claimer = (StreamClient(config.redis.url or "", config.redis, config.streams) for _ in range(2))
    owner.ensure_group(keys.results, SINK_GROUP)
    ids = [owner.publish(keys.results, f"result-{index}".encode()) for index in range(200)]
    owner.read_new(keys.results, SINK_GROUP, "slow", count=200, block_ms=None)

    def acknowledge_one_by_one() -> None:
        for entry_id in ids:
            owner.commit(keys.results, SINK_GROUP, Commit(acks=[entry_id], delete_acked=True), keys.deadletter)

    reported: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        acking = pool.submit(acknowledge_one_by_one)
        while not acking.done():
            claimed = claimer.claim_stale(keys.results, SINK_GROUP, "peer", 0, 1, keys.deadletter)
            reported.extend(letter.entry_id for letter in claimed.dead_letters)
            if claimed.entries:  # hand it back: the owner acknowledges it
                claimer.redis.xclaim(keys.results, SINK_GROUP, "slow", 0, [claimed.entries[0].entry_id])
        acking.result()
    owner.close()
    claimer.close()
    assert reported == []


def test_commit_appends_dead_letters_and_acks_together(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 2)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=2, block_ms=None)
    commit = Commit(
        appends=[(keys.results, b"decision-0")],
        dead_letters=[DeadLetter(ids[1], b"frame-1", "not_msgpack", "bad bytes", frame_id="")],
        acks=ids,
    )
    client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter)
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
    assert client.fetch(keys.results, client.last_id(keys.results)) == b"decision-0"
    letters = client.dead_letters(keys)
    assert letters == [
        {
            "reason": "not_msgpack",
            "detail": "bad bytes",
            "source_stream": keys.frames,
            "source_entry_id": ids[1],
            "frame_id": "",
        }
    ]


def test_a_commit_retried_after_its_reply_was_lost_appends_nothing_twice(client: StreamClient, keys: LineKeys) -> None:
    # A Redis stalled past the socket timeout runs the commit but its reply is lost; the client retries it. The
    # MULTI/EXEC appended every result and dead letter again (904 results for 900 frames in the outage runs).
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 3)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=3, block_ms=None)
    commit = Commit(
        appends=[(keys.results, b"decision-0"), (keys.results, b"decision-1")],
        dead_letters=[DeadLetter(ids[2], b"frame-2", "not_msgpack", "bad bytes")],
        acks=ids,
        trim_appends=False,
    )
    client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter)
    client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter)  # what _call's retry runs
    assert [entry.payload for entry in client.read_range(keys.results, "0-0", 10)] == [b"decision-0", b"decision-1"]
    assert len(client.dead_letters(keys)) == 1
    # a batch with one entry still pending is committed (its results may repeat a peer's; the sink publishes once)
    more = publish_many(client, keys, 1)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=1, block_ms=None)
    client.commit(keys.frames, SCORER_GROUP, Commit(appends=[(keys.results, b"decision-3")], acks=[ids[0], *more]),
                  keys.deadletter)  # fmt: skip
    assert client.read_range(keys.results, "0-0", 10)[-1].payload == b"decision-3"
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_batch_of_trimmed_entries_still_gets_its_dead_letters(client: StreamClient, keys: LineKeys) -> None:
    # A restarted worker re-reads its own pending entries, some trimmed meanwhile, and dead-letters those in its
    # commit. Trimmed entries are not in the stream: they must not make the commit look already done.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 3)
    client.read_new(keys.frames, SCORER_GROUP, "restarted", count=3, block_ms=None)
    client.redis.xtrim(keys.frames, maxlen=0, approximate=False)
    own = client.read_own_pending(keys.frames, SCORER_GROUP, "restarted", count=10)
    assert [entry.payload for entry in own] == [None, None, None]
    letters = [DeadLetter(entry_id, None, "entry_trimmed", "trimmed") for entry_id in ids]
    client.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=letters, acks=ids), keys.deadletter)
    assert [letter["source_entry_id"] for letter in client.dead_letters(keys)] == ids
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_publish_decision_once_is_idempotent_per_frame(client: StreamClient, keys: LineKeys) -> None:
    assert client.publish_decision_once(keys, "f-1", b"first", marker_ttl_s=60)
    assert not client.publish_decision_once(keys, "f-1", b"again", marker_ttl_s=60)
    assert client.publish_decision_once(keys, "f-2", b"other", marker_ttl_s=60)
    payloads = [entry.payload for entry in client.read_range(keys.decisions, "0-0", count=10)]
    assert payloads == [b"first", b"other"]
    assert 0 < client.redis.ttl(keys.published("f-1")) <= 60


def test_publish_decisions_once_batches_and_stays_idempotent(client: StreamClient, keys: LineKeys) -> None:
    assert client.publish_decision_once(keys, "f-1", b"first", marker_ttl_s=60)
    pairs = [("f-1", b"again"), ("f-2", b"second"), ("f-2", b"twice in one batch"), ("f-3", b"third")]
    batch = [DecisionToPublish(frame_id, "", payload) for frame_id, payload in pairs]
    outcomes = client.publish_decisions_once(keys, batch, marker_ttl_s=60)
    assert outcomes == [Publication.DUPLICATE, Publication.PUBLISHED, Publication.DUPLICATE, Publication.PUBLISHED]
    assert client.publish_decisions_once(keys, [], marker_ttl_s=60) == []
    payloads = [entry.payload for entry in client.read_range(keys.decisions, "0-0", count=10)]
    assert payloads == [b"first", b"second", b"third"]
    assert 0 < client.redis.ttl(keys.published("f-3")) <= 60


def test_a_frame_reusing_a_published_frame_id_is_published_once_too(client: StreamClient, keys: LineKeys) -> None:
    first = DecisionToPublish("dup-1", "100-0", b"good frame", b"good frame, id reused")
    second = DecisionToPublish("dup-1", "200-0", b"defect frame", b"defect frame, id reused")
    assert client.publish_decisions_once(keys, [first], marker_ttl_s=60) == [Publication.PUBLISHED]
    outcomes = client.publish_decisions_once(keys, [first, second, second], marker_ttl_s=60)
    assert outcomes == [Publication.DUPLICATE, Publication.PUBLISHED_FRAME_ID_REUSED, Publication.DUPLICATE]
    payloads = [entry.payload for entry in client.read_range(keys.decisions, "0-0", count=10)]
    assert payloads == [b"good frame", b"defect frame, id reused"]
    assert 0 < client.redis.ttl(keys.published("dup-1")) <= 60


def test_every_frame_reusing_an_id_is_recognised_for_a_full_ttl_and_the_marker_stays_bounded(
    client: StreamClient, keys: LineKeys
) -> None:
    """A camera that sends one id for every frame: a frame decided just before the id's first frame expires must
    still be recognised when redelivered, and frames older than the TTL leave the marker."""

    def publish(entry_id: str) -> Publication:
        [outcome] = client.publish_decisions_once(keys, [DecisionToPublish("cam", entry_id, b"d", b"d reused")], 1)
        return outcome

    assert publish("1-0") is Publication.PUBLISHED
    time.sleep(0.7)
    assert publish("2-0") is Publication.PUBLISHED_FRAME_ID_REUSED
    time.sleep(0.6)  # 1.3 s after the first frame, 0.6 s after the second: only the first is forgotten
    assert publish("2-0") is Publication.DUPLICATE
    assert client.redis.zrange(keys.published("cam"), 0, -1) == [b"2-0"]
    assert client.length(keys.decisions) == 2


def test_a_marker_left_by_an_older_sink_still_counts_as_published(client: StreamClient, keys: LineKeys) -> None:
    client.redis.set(keys.published("f-old"), "1", ex=60)
    assert not client.publish_decision_once(keys, "f-old", b"again", marker_ttl_s=60, frame_entry_id="1-0")
    assert client.length(keys.decisions) == 0


def test_publish_many_appends_in_order_in_one_call(client: StreamClient, keys: LineKeys) -> None:
    entry_ids = client.publish_many(keys.frames, [b"a", b"b", b"c"])
    assert [entry.entry_id for entry in client.read_range(keys.frames, "0-0", 10)] == entry_ids
    assert [client.fetch(keys.frames, entry_id) for entry_id in entry_ids] == [b"a", b"b", b"c"]
    assert client.publish_many(keys.frames, []) == []


def test_fetch_many_returns_payloads_in_order_and_none_when_gone(client: StreamClient, keys: LineKeys) -> None:
    first = client.publish(keys.frames, b"one")
    second = client.publish(keys.frames, b"two")
    assert client.fetch_many(keys.frames, [second, "1-1", first]) == [b"two", None, b"one"]
    assert client.fetch_many(keys.frames, []) == []


def test_streams_are_trimmed_to_about_maxlen(config: Config, keys: LineKeys) -> None:
    settings = config.streams.model_copy(update={"maxlen": 10})
    client = StreamClient(config.redis.url or "", config.redis, settings)
    for index in range(500):
        client.publish(keys.frames, str(index).encode())
    assert client.length(keys.frames) < 200
    assert client.fetch(keys.frames, client.last_id(keys.frames)) == b"499"
    client.close()


def test_missing_group_is_recreated_on_read(client: StreamClient, keys: LineKeys) -> None:
    publish_many(client, keys, 2)
    assert len(client.read_new(keys.frames, SCORER_GROUP, "a", count=5, block_ms=None)) == 2
    assert client.read_new(keys.frames, SCORER_GROUP, "a", count=5, block_ms=None) == []


def test_tail_and_read_range_see_entries_without_a_group(client: StreamClient, keys: LineKeys) -> None:
    ids = publish_many(client, keys, 3)
    tail = client.tail({keys.frames: ids[0]}, count=10, block_ms=None)
    assert [(stream, entry.entry_id) for stream, entry in tail] == [(keys.frames, ids[1]), (keys.frames, ids[2])]
    assert [entry.entry_id for entry in client.read_range(keys.frames, ids[1], 10)] == [ids[2]]


def test_health_keys_round_trip_and_expire(client: StreamClient, config: Config) -> None:
    prefix = config.streams.prefix
    client.write_health(f"{prefix}:health:score:w1", {"state": "ok"}, ttl_s=30)
    client.write_health(f"{prefix}:health:sink:s1", {"state": "draining"}, ttl_s=30)
    assert sorted(status["state"] for status in client.read_health(prefix)) == ["draining", "ok"]
    assert 0 < client.redis.pttl(f"{prefix}:health:score:w1") <= 30_000


def test_model_key_first_writer_wins_only_if_absent(client: StreamClient, keys: LineKeys) -> None:
    assert client.get_model_dir(keys) is None
    assert client.set_model_dir(keys, "/models/a", only_if_absent=True)
    assert not client.set_model_dir(keys, "/models/b", only_if_absent=True)
    assert client.get_model_dir(keys) == "/models/a"
    client.set_model_dir(keys, "/models/c")
    assert client.get_model_dir(keys) == "/models/c"


def test_idle_consumers_with_nothing_pending_are_forgotten(client: StreamClient, keys: LineKeys) -> None:
    import time

    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 3)
    client.read_new(keys.frames, SCORER_GROUP, "departed", count=1, block_ms=None)
    client.ack(keys.frames, SCORER_GROUP, ids[:1])
    client.read_new(keys.frames, SCORER_GROUP, "crashed", count=1, block_ms=None)  # still holds ids[1]
    client.read_new(keys.frames, SCORER_GROUP, "me", count=1, block_ms=None)
    client.ack(keys.frames, SCORER_GROUP, ids[2:])
    assert client.forget_idle_consumers(keys.frames, SCORER_GROUP, min_idle_ms=60_000, keep="me") == []
    assert client.forget_idle_consumers(keys.frames, SCORER_GROUP, min_idle_ms=0, keep="me") == []  # 0: never
    time.sleep(0.05)
    assert client.forget_idle_consumers(keys.frames, SCORER_GROUP, min_idle_ms=20, keep="me") == ["departed"]
    remaining = {row["name"].decode() for row in client.redis.xinfo_consumers(keys.frames, SCORER_GROUP)}
    assert remaining == {"crashed", "me"}  # a consumer with a pending entry is never dropped (claims recover it)
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "me", 0, 10, keys.deadletter).entries
    assert [entry.entry_id for entry in claimed] == [ids[1]]


def test_claims_and_pending_reads_recreate_a_vanished_group(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 2)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=2, block_ms=None)
    client.redis.xgroup_destroy(keys.frames, SCORER_GROUP)  # what a Redis restarted without its data looks like
    assert client.claim_stale(keys.frames, SCORER_GROUP, "a", 0, 10, keys.deadletter).entries == []
    client.redis.xgroup_destroy(keys.frames, SCORER_GROUP)
    assert client.read_own_pending(keys.frames, SCORER_GROUP, "a", count=10) == []
    # the group is back, reading from the start: nothing on the stream is lost
    assert [entry.entry_id for entry in client.read_new(keys.frames, SCORER_GROUP, "a", 10, None)] == ids


def test_own_pending_can_be_walked_once_past_entries_that_stay_pending(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 3)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=3, block_ms=None)
    first = client.read_own_pending(keys.frames, SCORER_GROUP, "a", count=2)
    assert [entry.entry_id for entry in first] == ids[:2]  # never acknowledged: a read from 0 returns them again
    rest = client.read_own_pending(keys.frames, SCORER_GROUP, "a", count=2, after_id=first[-1].entry_id)
    assert [entry.entry_id for entry in rest] == ids[2:]
    assert client.read_own_pending(keys.frames, SCORER_GROUP, "a", count=2, after_id=rest[-1].entry_id) == []


def test_dead_letters_keep_a_bounded_prefix_of_an_oversized_payload(client: StreamClient, keys: LineKeys) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = publish_many(client, keys, 2)
    client.read_new(keys.frames, SCORER_GROUP, "a", count=2, block_ms=None)
    huge = bytes(range(256)) * (3 * 1024 * 1024 // 256)  # 3 MiB
    small = b"x" * DEAD_LETTER_PAYLOAD_BYTES  # exactly at the limit: kept whole
    letters = [
        DeadLetter(ids[0], huge, "oversized_frame", "too big", frame_id="f" * 5000),
        DeadLetter(ids[1], small, "not_msgpack", "bad bytes"),
    ]
    client.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=letters, acks=ids), keys.deadletter)
    rows = client.redis.xrange(keys.deadletter)
    big_fields, small_fields = rows[0][1], rows[1][1]
    assert big_fields[b"payload"] == huge[:DEAD_LETTER_PAYLOAD_BYTES]
    assert big_fields[b"payload_bytes"] == str(len(huge)).encode()
    assert big_fields[b"payload_truncated"] == b"1"
    assert len(big_fields[b"frame_id"]) <= 1000
    assert small_fields[b"payload"] == small
    assert b"payload_truncated" not in small_fields and b"payload_bytes" not in small_fields
    assert client.redis.memory_usage(keys.deadletter) < 1024 * 1024


def test_a_publish_retried_after_a_lost_reply_adds_each_payload_once(config: Config) -> None:
    # Redis stalled past the socket timeout (fork or fsync on a loaded host, a paused VM; here SIGSTOP): the XADDs
    # sent before the timeout still run once it resumes, and the retry used to add every frame a second time
    # (one frame, two decisions: the plant's ingest did so after an 8 s stall).
    with EmbeddedRedis() as server:
        settings = RedisSettings(connect_timeout_s=0.3, reconnect_max_backoff_s=0.2)
        client = StreamClient(server.url, settings, config.streams)
        stream = f"{config.streams.prefix}:line-1:frames"
        after_id = client.publish(stream, b"earlier")
        process = server._process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            publishing = ThreadPoolExecutor(1).submit(client.publish_many, stream, [b"a", b"b"], after_id)
            wait_until_timed_out_once(client)
        finally:
            process.send_signal(signal.SIGCONT)
        entry_ids = publishing.result(timeout=30)
        rows = client.read_range(stream, "0-0", 100)
        assert [entry.payload for entry in rows] == [b"earlier", b"a", b"b"]
        assert entry_ids == [entry.entry_id for entry in rows[1:]]
        client.close()


def wait_until_timed_out_once(client: StreamClient) -> None:
    """Until the client has given up on a reply at least once (it logs each retry)."""
    handler = _Retries()
    logging.getLogger("pipeline.streams").addHandler(handler)
    try:
        deadline = time.monotonic() + 30
        while not handler.count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler.count, "the client never timed out"
    finally:
        logging.getLogger("pipeline.streams").removeHandler(handler)


class _Retries(logging.Handler):
    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "redis unavailable, retrying":
            self.count += 1


def test_a_stop_during_a_long_outage_gives_up_within_the_grace_period(config: Config) -> None:
    # Late in an outage the client sleeps reconnect_max_backoff_s (10 s by default) between attempts. A stop that
    # came during such a sleep was only seen at the next failed attempt, and the grace period counted from there: a
    # worker SIGTERMed 45 s into an outage gave up a whole backoff after drain_timeout_s, past TimeoutStopSec=30.
    with socket.socket() as probe:  # a port nobody listens on: every attempt is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = RedisSettings(connect_timeout_s=0.2, reconnect_max_backoff_s=3.0)
    client = StreamClient(f"redis://127.0.0.1:{port}/0", settings, config.streams)
    stop, grace_s = threading.Event(), 0.3
    client.stop_retrying_after(stop, grace_s)
    stopped_at: list[float] = []

    class StopAtFullBackoff(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "retry_in_s", 0) >= settings.reconnect_max_backoff_s and not stop.is_set():
                stopped_at.append(time.monotonic())  # about to sleep a whole backoff: SIGTERM now
                stop.set()

    handler = StopAtFullBackoff()
    logging.getLogger("pipeline.streams").addHandler(handler)
    try:
        with pytest.raises(StreamsUnavailable):
            client.length("anything")
        gave_up_after_s = time.monotonic() - stopped_at[0]
    finally:
        logging.getLogger("pipeline.streams").removeHandler(handler)
        client.close()
    assert gave_up_after_s < grace_s + 1.0


def test_a_stop_while_redis_hangs_gives_up_within_the_grace_period(config: Config) -> None:
    # A Redis that accepts connections and never answers (stalled, or a half-dead host): each attempt lasts the
    # socket timeout (connect_timeout_s + block_ms: 5.2 s by default). The grace period counted from the end of the
    # attempt during which the stop came, and an attempt started just before it ran on past it: with the defaults a
    # worker SIGTERMed in such an outage gave up up to 25 + 2 x 5.2 s after the stop, past TimeoutStopSec=30.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        port = silent.getsockname()[1]
        settings = RedisSettings(connect_timeout_s=1.0, reconnect_max_backoff_s=0.1)
        client = StreamClient(f"redis://127.0.0.1:{port}/0", settings, config.streams)
        stop, grace_s = threading.Event(), 1.5
        client.stop_retrying_after(stop, grace_s)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.length, "anything")
            time.sleep(1.5)  # half-way through the second attempt
            stopped_at = time.monotonic()
            stop.set()
            with pytest.raises(StreamsUnavailable):
                call.result(timeout=30)
            gave_up_after_s = time.monotonic() - stopped_at
        client.close()
    assert gave_up_after_s <= grace_s + 0.3
