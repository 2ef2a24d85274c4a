"""Claims against a real Redis: trimmed entries dead-lettered inside the claim, entries in hand kept from peers."""

from __future__ import annotations

import time

from pipeline.config import Config
from pipeline.streams import ENTRY_TRIMMED, SCORER_GROUP, Commit, DeadLetter, LineKeys, StreamClient


def read_by(client: StreamClient, keys: LineKeys, consumer: str, count: int) -> list[str]:
    """Publish ``count`` frames and deliver them to ``consumer``; their entry ids."""
    client.ensure_group(keys.frames, SCORER_GROUP)
    ids = [client.publish(keys.frames, f"frame-{index}".encode()) for index in range(count)]
    client.read_new(keys.frames, SCORER_GROUP, consumer, count=count, block_ms=None)
    return ids


def pending_on(client: StreamClient, keys: LineKeys) -> dict[str, str]:
    """Entry id -> the consumer it is pending on."""
    rows = client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 1000)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


def test_a_claim_dead_letters_trimmed_entries_itself_so_a_claimer_crashing_after_it_loses_none(
    client: StreamClient, keys: LineKeys
) -> None:
    # The claim used to hand trimmed entries back for the worker to dead-letter in its next commit, having already
    # dropped them from the pending list: a claimer that crashed in between lost them without a trace.
    ids = read_by(client, keys, "killed", 5)
    client.redis.xtrim(keys.frames, maxlen=2, approximate=False)
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "claimer", 0, 10, keys.deadletter)
    # ... and the claimer dies here, before committing anything
    letters = client.dead_letters(keys)
    assert [(row["source_entry_id"], row["reason"]) for row in letters] == [(i, ENTRY_TRIMMED) for i in ids[:3]]
    assert all("pending on killed" in letter["detail"] for letter in letters)
    assert pending_on(client, keys) == {ids[3]: "claimer", ids[4]: "claimer"}  # the rest to score
    assert [entry.entry_id for entry in claimed.entries] == ids[3:]
    assert [letter.entry_id for letter in claimed.dead_letters] == ids[:3]  # for the claimer's metrics
    assert client.claim_stale(keys.frames, SCORER_GROUP, "peer", 0, 10, keys.deadletter).dead_letters == []


def test_a_dead_letter_written_by_the_claim_has_the_fields_of_one_written_by_a_commit(
    client: StreamClient, keys: LineKeys
) -> None:
    ids = read_by(client, keys, "killed", 2)
    client.redis.xdel(keys.frames, ids[0])
    client.claim_stale(keys.frames, SCORER_GROUP, "claimer", 0, 10, keys.deadletter)
    letter = DeadLetter(ids[1], None, ENTRY_TRIMMED, "by a commit")
    client.commit(keys.frames, SCORER_GROUP, Commit(dead_letters=[letter], acks=[ids[1]]), keys.deadletter)
    by_claim, by_commit = (fields for _, fields in client.redis.xrange(keys.deadletter))
    assert sorted(by_claim) == sorted(by_commit)
    assert by_claim[b"payload"] == b"" and by_claim[b"frame_id"] == b""
    assert by_claim[b"source_stream"] == keys.frames.encode()


def test_kept_entries_are_not_claimed_however_long_they_are_held_and_are_once_no_longer_kept(
    client: StreamClient, keys: LineKeys, config: Config
) -> None:
    idle_ms = config.streams.claim_idle_ms
    ids = read_by(client, keys, "slow", 3)
    held_until = time.monotonic() + 3 * idle_ms / 1000.0
    while time.monotonic() < held_until:  # a batch three times as slow as claim_idle_ms
        assert client.keep_claimed(keys.frames, SCORER_GROUP, "slow", ids) == []
        assert client.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter).entries == []
        time.sleep(idle_ms / 3000.0)
    # the owner dies: nothing keeps its entries any more, and a peer claims them once idle
    time.sleep(idle_ms / 1000.0)
    claimed = client.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter).entries
    assert [entry.entry_id for entry in claimed] == ids
    assert [entry.deliveries for entry in claimed] == [2, 2, 2]  # keeping them was no delivery


def test_keeping_never_takes_back_an_entry_a_peer_has_claimed(client: StreamClient, keys: LineKeys) -> None:
    ids = read_by(client, keys, "stalled", 3)
    client.redis.xclaim(keys.frames, SCORER_GROUP, "peer", 0, [ids[1]])  # a peer's claim got there first
    assert client.keep_claimed(keys.frames, SCORER_GROUP, "stalled", ids) == [ids[1]]
    assert pending_on(client, keys) == {ids[0]: "stalled", ids[1]: "peer", ids[2]: "stalled"}
    client.ack(keys.frames, SCORER_GROUP, [ids[0]])  # committed meanwhile: skipped, not taken by a peer
    assert client.keep_claimed(keys.frames, SCORER_GROUP, "stalled", ids) == [ids[1]]
    assert pending_on(client, keys) == {ids[1]: "peer", ids[2]: "stalled"}
    assert client.keep_claimed(keys.frames, SCORER_GROUP, "stalled", []) == []


def test_keeping_leaves_a_trimmed_entry_pending_for_its_dead_letter(client: StreamClient, keys: LineKeys) -> None:
    # XCLAIM drops a deleted entry from the pending list (Redis 7): keeping it that way would lose its dead letter
    # if the owner then died. It is left pending (and ages: a peer's claim dead-letters it entry_trimmed).
    ids = read_by(client, keys, "owner", 2)
    client.redis.xtrim(keys.frames, maxlen=1, approximate=False)
    assert client.keep_claimed(keys.frames, SCORER_GROUP, "owner", ids) == []
    assert pending_on(client, keys) == {ids[0]: "owner", ids[1]: "owner"}


def test_an_entry_without_a_payload_field_is_told_from_a_trimmed_one_however_it_is_read(
    client: StreamClient, keys: LineKeys
) -> None:
    # An entry that camera software of its own published under another field name was read as a trimmed one: the
    # scorer dead-lettered it entry_trimmed, sending its integrator looking for a backlog the line did not have.
    client.ensure_group(keys.frames, SCORER_GROUP)
    misnamed = client.redis.xadd(keys.frames, {"frame": b"x", "camera": b"c"}).decode()
    gone = client.publish(keys.frames, b"frame")
    new, _ = client.read_new(keys.frames, SCORER_GROUP, "killed", 10, None)
    client.redis.xdel(keys.frames, gone)
    own, own_gone = client.read_own_pending(keys.frames, SCORER_GROUP, "killed", 10)
    (claimed,) = client.claim_stale(keys.frames, SCORER_GROUP, "claimer", 0, 10, keys.deadletter).entries
    for entry in (new, own, claimed):
        assert (entry.entry_id, entry.payload, entry.other_fields) == (misnamed, None, ("frame", "camera"))
    assert (own_gone.entry_id, own_gone.payload, own_gone.other_fields) == (gone, None, ())
