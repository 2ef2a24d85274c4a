"""A scoring worker on a batch slower than claim_idle_ms and the heartbeat's TTL, against a real Redis and model:
its frames are kept from peers and /healthz stays 200, until the batch has taken worker.max_batch_duration_s; frames of
a batch in hand that the line trims and a peer's claim dead-letters keep that one dead letter and get no decision."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.config import Config, config_from_mapping
from pipeline.health import HUNG_EXIT_STATUS
from pipeline.streams import SCORER_GROUP, Commit, LineKeys, StreamClient
from tests.workers.conftest import TinyLine
from tests.workers.helpers import decisions_in, frame_from_file, publish_frames, start_thread, wait_until
from workers.lifecycle import WorkerRuntime
from workers.score import ModelSlot, ScoredBatch, ScorerLike, ScoreWorker, load_model

HEARTBEAT_TTL_S = 1.5  # the default 15 s, scaled down like claim_idle_ms (500 ms in tests); the key is written 1/s


class GatedScorer:
    """The real tiny model, but each batch waits until ``gate`` opens: a batch as slow as the test wants."""

    def __init__(self, scorer: ScorerLike, gate: threading.Event) -> None:
        self.scorer, self.gate = scorer, gate
        self.model_id, self.threshold = scorer.model_id, scorer.threshold
        self.entered = threading.Event()

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return self.scorer.aspect_mismatch(height, width)

    def score(self, images: Sequence[np.ndarray]) -> ScoredBatch:
        self.entered.set()
        assert self.gate.wait(timeout=120), "the test never opened the gate"
        return self.scorer.score(images)


def gated_worker(runtime: WorkerRuntime, model_dir: Path, gate: threading.Event) -> tuple[ScoreWorker, GatedScorer]:
    runtime.heartbeat.ttl_s = HEARTBEAT_TTL_S
    scorers: list[GatedScorer] = []

    def load(path: Path) -> ScorerLike:
        scorers.append(GatedScorer(load_model("cpu")(path), gate))
        return scorers[-1]

    slot = ModelSlot(runtime, LineKeys(runtime.config.streams.prefix, "line-1"), load, model_dir)
    return ScoreWorker(runtime, "line-1", slot), scorers[0]


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_batch_slower_than_claim_idle_ms_is_neither_claimed_by_a_peer_nor_unhealthy(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    # A batch that took longer than claim_idle_ms (the full model on an overloaded host) was claimed and scored again
    # by a peer, and one longer than the heartbeat's 15 s turned /healthz 503: Kubernetes took the pod out of service
    runtime = make_runtime("score", "slow")
    gate = threading.Event()
    worker, scorer = gated_worker(runtime, tiny_line.model_dir, gate)
    client, keys = runtime.client, worker.keys
    frames = [frame_from_file(tiny_line.good_images[i % 4]) for i in range(4)]  # one batch (max_batch 4)
    publish_frames(client, keys, frames)
    thread = start_thread(worker.run)
    peer = StreamClient(worker_config.redis.url or "", worker_config.redis, worker_config.streams)
    idle_ms = worker_config.streams.claim_idle_ms
    try:
        assert scorer.entered.wait(timeout=60)
        claimed, codes = [], set()
        held_until = time.monotonic() + max(3 * idle_ms / 1000.0, 2 * HEARTBEAT_TTL_S)
        while time.monotonic() < held_until:
            claimed += peer.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter).entries
            codes |= {status(runtime.server.port, "/healthz"), status(runtime.server.port, "/livez")}
            time.sleep(0.05)
        assert claimed == [], "a peer claimed frames the slow worker was scoring"
        assert codes == {200}
        health = client.read_health(worker_config.streams.prefix)
        assert [(h["state"], h["in_hand"]) for h in health] == [("ok", 4)] and health[0]["busy_s"] > 1.0
        gate.set()
        wait_until(lambda: client.length(keys.results) >= len(frames), what="the slow batch's results")
    finally:
        gate.set()
        runtime.stop.set()
        thread.join(timeout=30)
        peer.close()
    assert sorted(d.frame_id for d in decisions_in(client, keys.results)) == sorted(f.frame_id for f in frames)
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0


def test_a_hung_batch_is_left_to_the_peers_and_turns_the_worker_unhealthy(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    # Kept fresh forever, a hung model's frames would never be claimed and its pod never restarted: past
    # worker.max_batch_duration_s the worker stops keeping them and stops beating.
    data = worker_config.model_dump(mode="json")
    data["worker"]["max_batch_duration_s"] = 1.5
    config = config_from_mapping(data)
    runtime = make_runtime("score", "hung", config)
    gate = threading.Event()
    worker, scorer = gated_worker(runtime, tiny_line.model_dir, gate)
    client, keys = runtime.client, worker.keys
    ids = publish_frames(client, keys, [frame_from_file(tiny_line.good_images[i % 4]) for i in range(4)])
    thread = start_thread(worker.run)
    peer = StreamClient(config.redis.url or "", config.redis, config.streams)
    claimed: list[str] = []

    def peer_claimed_all() -> bool:
        idle_ms = config.streams.claim_idle_ms
        entries = peer.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter).entries
        claimed.extend(entry.entry_id for entry in entries)
        return sorted(claimed) == sorted(ids)

    try:
        assert scorer.entered.wait(timeout=60)
        started = time.monotonic()
        wait_until(peer_claimed_all, timeout_s=20, what="a peer to claim the hung worker's frames")
        assert time.monotonic() - started >= 1.5  # kept until the bound (unkept, claimed after claim_idle_ms)
        wait_until(lambda: status(runtime.server.port, "/livez") == 503, timeout_s=10, what="/livez to turn 503")
        assert status(runtime.server.port, "/healthz") == 503
        wait_until(lambda: runtime.heartbeat.exit_status == HUNG_EXIT_STATUS, timeout_s=10, what="the hung exit")
        gate.set()  # the model comes back: its late commit acknowledges the frames (for the group, as XACK does)
        wait_until(lambda: client.group_stats(keys.frames)[SCORER_GROUP].pending == 0, what="the late commit")
        assert sorted(d.frame_entry_id or "" for d in decisions_in(client, keys.results)) == sorted(ids)
        peer_results = Commit(appends=[(keys.results, b"peer's result")], acks=ids, trim_appends=False)
        peer.commit(keys.frames, SCORER_GROUP, peer_results, keys.deadletter)  # the peer's, finding them committed
        assert client.length(keys.results) == len(ids)
    finally:
        gate.set()
        runtime.stop.set()
        thread.join(timeout=30)
        peer.close()


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


class SteppedScorer:
    """The real tiny model; batch ``n`` (0, 1, ...) waits until ``gates[n]`` opens, later batches run at once."""

    def __init__(self, scorer: ScorerLike, gates: Sequence[threading.Event]) -> None:
        self.scorer, self.gates = scorer, gates
        self.model_id, self.threshold = scorer.model_id, scorer.threshold
        self.entered = [threading.Event() for _ in gates]
        self.batches = 0

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        return self.scorer.aspect_mismatch(height, width)

    def score(self, images: Sequence[np.ndarray]) -> ScoredBatch:
        index, self.batches = self.batches, self.batches + 1
        if index < len(self.gates):
            self.entered[index].set()
            assert self.gates[index].wait(timeout=120), "the test never opened the gate"
        return self.scorer.score(images)


def test_entries_a_worker_claims_are_kept_while_it_first_scores_the_batch_it_had_in_hand(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], worker_config: Config
) -> None:
    # A claim comes back while the worker holds a batch it has read but not scored (the pipelined in_hand): it scores
    # that batch first, then the claimed frames. Not kept meanwhile, a slow in_hand batch left them to a peer's claim
    # claim_idle_ms later: scored twice, one delivery more each (towards max_deliveries).
    runtime = make_runtime("score", "slow")
    runtime.heartbeat.ttl_s = HEARTBEAT_TTL_S
    gates = [threading.Event(), threading.Event()]
    scorers: list[SteppedScorer] = []

    def load(path: Path) -> ScorerLike:
        scorers.append(SteppedScorer(load_model("cpu")(path), gates))
        return scorers[-1]

    keys = LineKeys(worker_config.streams.prefix, "line-1")
    worker = ScoreWorker(runtime, "line-1", ModelSlot(runtime, keys, load, tiny_line.model_dir))
    scorer, client = scorers[0], runtime.client
    idle_ms = worker_config.streams.claim_idle_ms
    images = [tiny_line.good_images[i % 4] for i in range(8)]
    publish_frames(client, keys, [frame_from_file(path) for path in images])  # two batches: E, then F in hand
    thread = start_thread(worker.run)
    peer = StreamClient(worker_config.redis.url or "", worker_config.redis, worker_config.streams)
    claimed: list[str] = []
    try:
        assert scorer.entered[0].wait(timeout=60)  # scoring E, F read and in hand
        dead_ids = publish_frames(client, keys, [frame_from_file(path) for path in images[:2]])
        client.read_new(keys.frames, SCORER_GROUP, "dead", count=2, block_ms=None)  # a peer that then died
        time.sleep(1.5 * idle_ms / 1000.0)
        gates[0].set()  # E done: the worker's next turn claims the dead peer's frames, then scores F first
        assert scorer.entered[1].wait(timeout=60)
        rows = client.redis.xpending_range(keys.frames, SCORER_GROUP, "-", "+", 100, consumername="slow")
        assert set(dead_ids) <= {row["message_id"].decode() for row in rows}, "the worker did not claim them"
        held_until = time.monotonic() + 3 * idle_ms / 1000.0
        while time.monotonic() < held_until:  # F three times as slow as claim_idle_ms
            entries = peer.claim_stale(keys.frames, SCORER_GROUP, "peer", idle_ms, 10, keys.deadletter).entries
            claimed += [entry.entry_id for entry in entries]
            time.sleep(0.05)
        gates[1].set()
        wait_until(lambda: client.length(keys.results) >= 10, what="every frame's result")
    finally:
        for gate in gates:
            gate.set()
        runtime.stop.set()
        thread.join(timeout=30)
        peer.close()
    assert claimed == [], "a peer claimed the frames the worker had claimed and was about to score"
    assert client.length(keys.results) == 10
    assert client.group_stats(keys.frames)[SCORER_GROUP].pending == 0
