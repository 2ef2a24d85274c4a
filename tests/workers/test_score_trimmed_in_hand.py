"""A scoring worker whose batch in hand is trimmed from the frames stream and dead-lettered by a peer's claim (a line
that trims faster than the batch takes), against a real Redis and model: each frame keeps that one dead letter."""

from __future__ import annotations

import threading
from collections.abc import Callable

from pipeline.config import Config
from pipeline.streams import SCORER_GROUP, StreamClient
from tests.workers.conftest import TinyLine
from tests.workers.helpers import decisions_in, frame_from_file, publish_frames, start_thread, wait_until
from tests.workers.test_score_slow_batches import gated_worker
from workers.lifecycle import WorkerRuntime


def test_frames_a_peer_dead_lettered_as_trimmed_while_in_hand_get_no_decision_too(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    # Entries trimmed while in hand cannot be kept from claims; the claim that finds them dead-letters them
    # entry_trimmed. The worker, done with the batch, still appended its results: a dead letter and a decision for
    # each frame (the chaos soak at streams.maxlen 300, a scorer SIGSTOPped past claim_idle_ms).
    runtime = make_runtime("score", "slow")
    gate = threading.Event()
    worker, scorer = gated_worker(runtime, tiny_line.model_dir, gate)
    client, keys = runtime.client, worker.keys
    trimmed = publish_frames(client, keys, [frame_from_file(tiny_line.good_images[i % 4]) for i in range(4)])
    thread = start_thread(worker.run)
    peer = StreamClient(worker_config.redis.url or "", worker_config.redis, worker_config.streams)
    letters: list[str] = []

    def peer_dead_lettered_all() -> bool:
        idle_ms = worker_config.streams.claim_idle_ms
        claimed = peer.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter)
        letters.extend(letter.entry_id for letter in claimed.dead_letters)
        return sorted(letters) == sorted(trimmed)

    try:
        assert scorer.entered.wait(timeout=60)  # the batch of 4 is on the model
        client.redis.xtrim(keys.frames, maxlen=0, approximate=False)
        wait_until(peer_dead_lettered_all, timeout_s=20, what="a peer's claim to dead-letter the trimmed frames")
        gate.set()
        (later,) = publish_frames(client, keys, [frame_from_file(tiny_line.good_images[0])])
        wait_until(lambda: later in {d.frame_entry_id for d in decisions_in(client, keys.results)},
                   what="the next frame's result (committed after the trimmed batch's)")  # fmt: skip
        assert [d.frame_entry_id for d in decisions_in(client, keys.results)] == [later]
        assert sorted(row["source_entry_id"] for row in client.dead_letters(keys)) == sorted(trimmed)
    finally:
        gate.set()
        runtime.stop.set()
        thread.join(timeout=30)
        peer.close()
