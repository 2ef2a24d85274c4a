"""Commits that overlap another commit of the same entries (a peer's claim, a retry): each dead letter written once.

A claim page (``worker.max_batch`` idle entries in id order, any consumer's) does not follow the stalled owner's batch
boundaries, so a peer can claim and commit part of a batch the owner, resumed, then commits whole; a retried commit
(its reply lost to a Redis restart) meets entries its first try acknowledged and the sink deleted.
"""

from __future__ import annotations

from pipeline.streams import SCORER_GROUP, SINK_GROUP, Commit, DeadLetter, LineKeys, StreamClient


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
