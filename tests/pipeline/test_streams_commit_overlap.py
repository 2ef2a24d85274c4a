"""Commits that overlap another commit or claim of the same entries (a peer's, a retry): each dead letter and result
written once, and no result for an entry a peer's claim dead-lettered.

A claim page (``worker.max_batch`` idle entries in id order, any consumer's) does not follow the stalled owner's batch
boundaries, so a peer can claim and commit part of a batch the owner, resumed, then commits whole; a retried commit
(its reply lost to a Redis restart) meets entries its first try acknowledged and the sink deleted.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from pipeline.config import RedisSettings
from pipeline.streams import (
    COMMIT_REPLY_TTL_S,
    SCORER_GROUP,
    SINK_GROUP,
    Commit,
    DeadLetter,
    LineKeys,
    StreamClient,
    commit_reply_key,
)


def test_a_batch_partly_claimed_and_committed_by_a_peer_dead_letters_each_entry_once(
    client: StreamClient, keys: LineKeys
) -> None:
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(3)]
    client.read_new(keys.frames, SCORER_GROUP, "stalled", count=3, block_ms=None)
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "peer", 0, 2, keys.deadletter).entries
    assert [entry.entry_id for entry in claimed] == ids[:2]
    letter = DeadLetter(ids[1], b"frame-1", "not_msgpack", "bad bytes", frame_id="")
    by_peer = Commit(appends=[(keys.results, b"result-0")], dead_letters=[letter], acks=ids[:2], trim_appends=False)
    written_by_peer = client.commit(keys.frames, SCORER_GROUP, by_peer, keys.deadletter)
    # the stalled owner resumes and commits its whole batch: ids[2] is still its own, so the batch is not "already
    # committed", yet the dead letter of ids[1] is the peer's
    by_owner = Commit(appends=[(keys.results, b"result-0"), (keys.results, b"result-2")], dead_letters=[letter],
                      acks=ids, trim_appends=False)  # fmt: skip
    written_by_owner = client.commit(keys.frames, SCORER_GROUP, by_owner, keys.deadletter)
    assert [row["source_entry_id"] for row in client.dead_letters(keys)] == [ids[1]]
    assert (written_by_peer, written_by_owner) == ([letter], [])  # what each counts in its metrics
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_sink_commit_retried_after_its_reply_was_lost_dead_letters_once(client: StreamClient, keys: LineKeys) -> None:
    # The sink deletes the results it acknowledges: on the retry they are gone, which read as "trimmed, still to be
    # dead-lettered", and the dead letter was appended a second time.
    client.ensure_group(keys.results, SINK_GROUP)
    ids = [client.publish(keys.results, f"result-{index}".encode()) for index in range(2)]
    client.read_new(keys.results, SINK_GROUP, "sink", count=2, block_ms=None)
    letter = DeadLetter(ids[0], b"result-0", "invalid_anomaly_map", "map of 3 bytes", frame_id="f-0")
    commit = Commit(dead_letters=[letter], acks=ids, delete_acked=True)
    first = client.commit(keys.results, SINK_GROUP, commit, keys.deadletter)
    retried = client.commit(keys.results, SINK_GROUP, commit, keys.deadletter)  # what _call's retry runs
    assert [row["source_entry_id"] for row in client.dead_letters(keys)] == [ids[0]]
    assert (first, retried) == ([letter], [])
    assert client.length(keys.results) == 0


def test_results_of_entries_a_peer_dead_lettered_as_trimmed_are_not_appended(
    client: StreamClient, keys: LineKeys
) -> None:
    # A line trimming faster than a stalled scorer's batch: a peer's claim finds the batch's entries trimmed and
    # dead-letters them entry_trimmed; the scorer resumed and appended their results, so each frame had a dead letter
    # and a decision (the chaos soak at streams.maxlen 300). A result goes out only for an entry its commit acked.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(3)]
    client.read_new(keys.frames, SCORER_GROUP, "stalled", count=3, block_ms=None)
    client.redis.xtrim(keys.frames, maxlen=0, approximate=False)
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "peer", 0, 10, keys.deadletter)
    assert [letter.entry_id for letter in claimed.dead_letters] == ids
    results = [(keys.results, f"result-{index}".encode()) for index in range(3)]
    resumed = Commit(appends=results, append_sources=ids, acks=ids, trim_appends=False)
    assert client.commit(keys.frames, SCORER_GROUP, resumed, keys.deadletter) == []
    assert client.length(keys.results) == 0
    assert [row["reason"] for row in client.dead_letters(keys)] == ["entry_trimmed"] * 3


def test_a_result_is_appended_for_each_entry_the_commit_acknowledged(client: StreamClient, keys: LineKeys) -> None:
    # The batch's other entries still get theirs; an append naming no entry (or one outside the acks) always goes out.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(3)]
    client.read_new(keys.frames, SCORER_GROUP, "stalled", count=3, block_ms=None)
    client.redis.xtrim(keys.frames, maxlen=1, approximate=False)  # ids[2] stays
    client.claim_stale(keys.frames, SCORER_GROUP, "peer", 0, 1, keys.deadletter)  # dead-letters ids[0] only
    results = [(keys.results, f"result-{index}".encode()) for index in range(3)] + [(keys.results, b"unnamed")]
    resumed = Commit(appends=results, append_sources=[*ids, ""], acks=ids, trim_appends=False)
    client.commit(keys.frames, SCORER_GROUP, resumed, keys.deadletter)
    appended = [entry.payload for entry in client.read_range(keys.results, "0-0", 10)]
    assert appended == [b"result-1", b"result-2", b"unnamed"]
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_append_sources_name_one_entry_per_append(client: StreamClient, keys: LineKeys) -> None:
    commit = Commit(appends=[(keys.results, b"r")], append_sources=["1-0", "2-0"], acks=["1-0"])
    with pytest.raises(ValueError, match="append_sources"):
        client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter)


def test_a_commit_after_the_group_is_gone_appends_everything(client: StreamClient, keys: LineKeys) -> None:
    # Redis restarted without its data: XACK answers 0 for every entry as if a peer had committed them, yet nobody
    # else has them; the frames the worker had in hand keep their results and dead letters.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(2)]
    client.read_new(keys.frames, SCORER_GROUP, "a", count=2, block_ms=None)
    client.redis.delete(keys.frames)
    letter = DeadLetter(ids[1], b"frame-1", "not_msgpack", "bad bytes")
    commit = Commit(appends=[(keys.results, b"result-0")], append_sources=ids[:1], dead_letters=[letter], acks=ids,
                    trim_appends=False)  # fmt: skip
    assert client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter) == [letter]
    assert [entry.payload for entry in client.read_range(keys.results, "0-0", 10)] == [b"result-0"]
    assert [row["source_entry_id"] for row in client.dead_letters(keys)] == [ids[1]]


def test_a_commit_after_redis_lost_its_data_and_a_peer_recreated_the_group_appends_everything(
    client: StreamClient, keys: LineKeys
) -> None:
    # Redis restarted empty, a camera published again and a peer's read recreated the group before this worker
    # committed its batch in hand: XACK answers 0 as for entries a peer dead-lettered, but nobody else has them.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(2)]
    client.read_new(keys.frames, SCORER_GROUP, "a", count=2, block_ms=None)
    client.redis.delete(keys.frames, keys.deadletter, keys.results)
    client.publish(keys.frames, b"after the restart")
    client.read_new(keys.frames, SCORER_GROUP, "peer", count=1, block_ms=None)  # NOGROUP: recreated
    letter = DeadLetter(ids[1], b"frame-1", "not_msgpack", "bad bytes")
    commit = Commit(appends=[(keys.results, b"result-0")], append_sources=ids[:1], dead_letters=[letter], acks=ids,
                    trim_appends=False)  # fmt: skip
    assert client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter) == [letter]
    assert [entry.payload for entry in client.read_range(keys.results, "0-0", 10)] == [b"result-0"]


class ReplyLost:
    """The commit script as Redis runs it, whose first reply never reaches the client (Redis stalled past the socket
    timeout, or restarted right after): ``StreamClient._call`` retries the same call."""

    def __init__(self, script: Any) -> None:
        self.script, self.calls = script, 0

    def __call__(self, **arguments: Any) -> Any:
        self.calls += 1
        reply = self.script(**arguments)
        if self.calls == 1:
            raise redis.TimeoutError("reply lost")
        return reply


def test_a_scorer_commit_whose_reply_was_lost_reports_the_dead_letters_its_first_try_appended(
    client: StreamClient, keys: LineKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retry found the batch acknowledged ("already committed") and returned no dead letters, so the worker's
    # lineinspect_dead_letters_total missed the letters the first try had appended.
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(3)]
    client.read_new(keys.frames, SCORER_GROUP, "a", count=3, block_ms=None)
    letter = DeadLetter(ids[2], b"frame-2", "not_msgpack", "bad bytes")
    commit = Commit(appends=[(keys.results, b"result-0"), (keys.results, b"result-1")], append_sources=ids[:2],
                    dead_letters=[letter], acks=ids, trim_appends=False)  # fmt: skip
    lost = ReplyLost(client._commit)
    monkeypatch.setattr(client, "_commit", lost)
    assert client.commit(keys.frames, SCORER_GROUP, commit, keys.deadletter) == [letter]
    assert lost.calls == 2
    assert [entry.payload for entry in client.read_range(keys.results, "0-0", 10)] == [b"result-0", b"result-1"]
    assert [row["source_entry_id"] for row in client.dead_letters(keys)] == [ids[2]]
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_sink_commit_whose_reply_was_lost_reports_its_dead_letter_once(
    client: StreamClient, keys: LineKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.ensure_group(keys.results, SINK_GROUP)
    ids = [client.publish(keys.results, f"result-{index}".encode()) for index in range(2)]
    client.read_new(keys.results, SINK_GROUP, "sink", count=2, block_ms=None)
    letter = DeadLetter(ids[0], b"result-0", "invalid_anomaly_map", "map of 3 bytes", frame_id="f-0")
    monkeypatch.setattr(client, "_commit", ReplyLost(client._commit))
    commit = Commit(dead_letters=[letter], acks=ids, delete_acked=True)
    assert client.commit(keys.results, SINK_GROUP, commit, keys.deadletter) == [letter]
    assert [row["source_entry_id"] for row in client.dead_letters(keys)] == [ids[0]]
    assert client.length(keys.results) == 0
    # a second commit of the same letters (another call, not a retry: a peer's, say) appends and reports none
    assert client.commit(keys.results, SINK_GROUP, commit, keys.deadletter) == []


def test_commits_with_dead_letters_leave_one_reply_key_per_client_and_a_lost_reply_still_comes_back(
    client: StreamClient, keys: LineKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each commit with dead letters kept its reply an hour for a retry after a lost reply: under a flood of garbage
    # frames a scorer commits ~690 such batches a second (8 frames each, measured against a real redis-server), about
    # 2.5 million keys and 560 MB an hour per scorer. The client's next commit now deletes the keys whose replies came.
    client.ensure_group(keys.frames, SCORER_GROUP)

    def commit_garbage(count: int) -> list[DeadLetter]:
        ids = [client.publish(keys.frames, b"\xc1 garbage") for _ in range(count)]
        client.read_new(keys.frames, SCORER_GROUP, "a", count=count, block_ms=None)
        letters = [DeadLetter(entry_id, b"\xc1 garbage", "not_msgpack", "bad bytes") for entry_id in ids]
        return client.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=letters, acks=ids), keys.deadletter)

    def reply_keys() -> list[bytes]:
        return list(client.redis.scan_iter(match=commit_reply_key(keys.deadletter, "*"), count=1000))

    for _ in range(20):
        assert len(commit_garbage(2)) == 2
    (kept,) = reply_keys()  # the last commit's: its client has not committed since
    assert 0 < client.redis.ttl(kept) <= COMMIT_REPLY_TTL_S
    lost = ReplyLost(client._commit)
    monkeypatch.setattr(client, "_commit", lost)
    assert len(commit_garbage(3)) == 3  # the retry gets the first try's reply back: its three letters
    assert lost.calls == 2 and len(client.dead_letters(keys)) == 43
    (after_retry,) = reply_keys()
    assert after_retry != kept
    monkeypatch.undo()
    client.commit(keys.frames, SCORER_GROUP, Commit(acks=["0-1"]), keys.deadletter)  # no letters, so no key of its own
    assert reply_keys() == []
    # another client's reply key is its own to delete
    other = StreamClient(client.url, RedisSettings(), client.settings)
    try:
        ids = [other.publish(keys.frames, b"\xc1")]
        other.read_new(keys.frames, SCORER_GROUP, "b", count=1, block_ms=None)
        other.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=[DeadLetter(ids[0], b"\xc1", "not_msgpack", "x")],
                                                       acks=ids), keys.deadletter)  # fmt: skip
        commit_garbage(1)
        assert len(reply_keys()) == 2
    finally:
        other.close()
