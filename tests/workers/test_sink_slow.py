"""A sink whose overlay writer is slow (a disk stall), against a real Redis: the results it holds are kept from
claims, its own included, and it stays healthy while its loop waits on the writer's full queue, until the writer has
spent worker.max_batch_duration_s on one batch; then its results go to the claims like a crashed sink's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import encode_decision
from pipeline.config import Config, config_from_mapping
from pipeline.messages import Decision
from pipeline.streams import SINK_GROUP, StreamClient
from tests.workers.helpers import decisions_in, start_thread, wait_until
from tests.workers.test_score_slow_batches import HEARTBEAT_TTL_S, status
from tests.workers.test_sink import _frames_with_results
from workers.lifecycle import WorkerRuntime
from workers.sink import HEATMAP_QUEUE, READ_COUNT, SinkWorker


class StalledDisk:
    """The sink's real overlay writing, each overlay waiting until ``gate`` opens: a disk stall as long as the test
    wants (a test hook on the heatmap store, Redis untouched)."""

    def __init__(self, sink: SinkWorker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate, self.entered = threading.Event(), threading.Event()
        write = sink.heatmaps.write

        def stalled_write(*args: Any) -> Path:
            self.entered.set()
            assert self.gate.wait(timeout=120), "the test never ended the stall"
            return write(*args)

        monkeypatch.setattr(sink.heatmaps, "write", stalled_write)


@pytest.fixture
def slow_sink(
    make_runtime: Callable[..., WorkerRuntime], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]]:
    """``make(name, count, config=None)``: a sink (heartbeat TTL scaled down like claim_idle_ms) with a stalled
    disk, and ``count`` results published for it."""

    def make(name: str, count: int, config: Config | None = None) -> tuple[SinkWorker, StalledDisk, list[Decision]]:
        runtime = make_runtime("sink", name, config)
        runtime.heartbeat.ttl_s = HEARTBEAT_TTL_S
        sink = SinkWorker(runtime, "line-1")
        _frames, results = _frames_with_results(sink, count)
        _publish(sink, results)
        return sink, StalledDisk(sink, monkeypatch), results

    return make


def _publish(sink: SinkWorker, results: list[Decision]) -> None:
    sink.runtime.client.ensure_group(sink.keys.results, SINK_GROUP)
    for result in results:
        sink.runtime.client.publish(sink.keys.results, encode_decision(result))


def _assert_each_published_once_with_its_heatmap(client: StreamClient, decisions: str, results: list[Decision]) -> None:
    published = decisions_in(client, decisions)
    assert sorted(d.frame_id for d in published) == sorted(r.frame_id for r in results)
    assert all(d.heatmap_ref and "heatmap_error" not in d.metadata for d in published)


def _stop(sink: SinkWorker, disk: StalledDisk, thread: threading.Thread) -> None:
    disk.gate.set()
    sink.runtime.stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_stalled_writer_keeps_its_results_from_peers_and_the_sink_healthy(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]], worker_config: Config
) -> None:
    # Past claim_idle_ms a peer sink claimed the results waiting for the stalled writer and drew and published them
    # as well; and with the writer's queue full the sink's loop, blocked handing it more, beat no more: /healthz and
    # /livez turned 503 a heartbeat TTL later and the liveness probe restarted a sink that was only slow.
    sink, disk, results = slow_sink("slow", READ_COUNT + HEATMAP_QUEUE + 8)  # more than the writer holds
    client, keys = sink.runtime.client, sink.keys
    thread = start_thread(sink.run)
    peer = StreamClient(worker_config.redis.url or "", worker_config.redis, worker_config.streams)
    idle_ms = worker_config.streams.claim_idle_ms
    try:
        assert disk.entered.wait(timeout=30)
        wait_until(lambda: client.group_stats(keys.results)[SINK_GROUP].lag == 0, what="the sink to read them all")
        claimed, codes = [], set()
        stalled_until = time.monotonic() + max(4 * idle_ms / 1000.0, 3 * HEARTBEAT_TTL_S)
        while time.monotonic() < stalled_until:
            claimed += peer.claim_stale(keys.results, SINK_GROUP, "peer", idle_ms, 100, keys.deadletter).entries
            codes |= {status(sink.runtime.server.port, "/healthz"), status(sink.runtime.server.port, "/livez")}
            time.sleep(0.05)
        assert claimed == [], "a peer claimed results the slow sink was writing"
        assert codes == {200}
        (health,) = client.read_health(worker_config.streams.prefix)
        assert health["state"] == "ok" and health["in_hand"] > 0
        assert decisions_in(client, keys.decisions) == []
        disk.gate.set()
        wait_until(lambda: len(decisions_in(client, keys.decisions)) == len(results), what="the decisions")
    finally:
        peer.close()
        _stop(sink, disk, thread)
    _assert_each_published_once_with_its_heatmap(client, keys.decisions, results)
    assert client.dead_letters(keys) == []
    assert sink.runtime.metrics.registry.get_sample_value("lineinspect_duplicate_decisions_total",
                                                          {"line": "line-1"}) is None  # fmt: skip
    assert client.group_stats(keys.results)[SINK_GROUP].pending == 0


def test_a_lone_sink_does_not_take_back_its_own_slow_results_and_dead_letter_them(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]], worker_config: Config
) -> None:
    # The sink's claims take idle results from every consumer, itself included: a result waiting on a stalled writer
    # came back to its own loop every claim_idle_ms, and after streams.max_deliveries it was dead-lettered
    # max_deliveries_exceeded and its decision published without heatmap, though nothing was wrong with it. The
    # overlay written once the disk came back was then referenced by no decision.
    sink, disk, _results = slow_sink("lone", 1)
    client, keys = sink.runtime.client, sink.keys
    thread = start_thread(sink.run)
    try:
        assert disk.entered.wait(timeout=30)
        deliveries = worker_config.streams.max_deliveries + 2
        time.sleep(deliveries * worker_config.streams.claim_idle_ms / 1000.0)  # that many claims' worth of stall
        assert decisions_in(client, keys.decisions) == [] and client.dead_letters(keys) == []
        disk.gate.set()
        wait_until(lambda: decisions_in(client, keys.decisions) != [], what="the decision")
    finally:
        _stop(sink, disk, thread)
    (published,) = decisions_in(client, keys.decisions)
    assert published.heatmap_ref and Path(published.heatmap_ref).exists() and "heatmap_error" not in published.metadata
    assert client.dead_letters(keys) == []


def test_a_writer_slow_on_each_overlay_of_a_batch_is_not_taken_for_hung(
    make_runtime: Callable[..., WorkerRuntime], worker_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer takes up to READ_COUNT (64) overlays in one step, and the bound counted the whole step: on a disk
    # slow on every write (here 0.25 s an overlay, 24 of them, against a 1 s bound) the sink, making progress all
    # along, was taken for hung, stopped beating and, since b23e049, ended itself (exit 3) a heartbeat TTL later.
    data = worker_config.model_dump(mode="json")
    data["worker"]["max_batch_duration_s"] = 1.0
    runtime = make_runtime("sink", "slow-disk", config_from_mapping(data))
    runtime.heartbeat.ttl_s = HEARTBEAT_TTL_S
    sink = SinkWorker(runtime, "line-1")
    _frames, results = _frames_with_results(sink, 24)
    write = sink.heatmaps.write

    def slow_write(*args: Any) -> Path:
        time.sleep(0.25)
        return write(*args)

    monkeypatch.setattr(sink.heatmaps, "write", slow_write)
    _publish(sink, results)
    client, keys = runtime.client, sink.keys
    thread = start_thread(sink.run)
    try:
        wait_until(lambda: len(decisions_in(client, keys.decisions)) == len(results), timeout_s=60, what="decisions")
    finally:
        sink.runtime.stop.set()
        thread.join(timeout=30)
    assert runtime.heartbeat.exit_status is None  # never taken for hung, so never asked to exit
    _assert_each_published_once_with_its_heatmap(client, keys.decisions, results)
    assert client.dead_letters(keys) == []


def test_a_writer_hung_past_max_batch_duration_leaves_its_results_to_the_claims(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]], worker_config: Config
) -> None:
    # Kept for ever, a hung writer's failing frames would never get a decision: past worker.max_batch_duration_s its
    # results are left to the claims, and after streams.max_deliveries published without heatmap (dead-lettered).
    data = worker_config.model_dump(mode="json")
    data["worker"]["max_batch_duration_s"] = 1.5
    sink, disk, _results = slow_sink("hung", 1, config_from_mapping(data))
    client, keys = sink.runtime.client, sink.keys
    thread = start_thread(sink.run)
    try:
        assert disk.entered.wait(timeout=30)
        started = time.monotonic()
        wait_until(lambda: decisions_in(client, keys.decisions) != [], timeout_s=30, what="the hung frame's decision")
        assert time.monotonic() - started >= 1.5  # kept until the bound
    finally:
        _stop(sink, disk, thread)  # the writer, back, finds the decision out: not published again
    (published,) = decisions_in(client, keys.decisions)
    assert published.heatmap_ref is None and published.metadata["heatmap_error"] == "max_deliveries_exceeded"
    assert [letter["reason"] for letter in client.dead_letters(keys)] == ["max_deliveries_exceeded"]
    assert client.group_stats(keys.results)[SINK_GROUP].pending == 0


def test_a_stop_while_the_writer_is_stalled_and_its_queue_full_exits_and_leaves_the_results_pending(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]],
    make_runtime: Callable[..., WorkerRuntime],
    worker_config: Config,
) -> None:
    # SIGTERM while the loop was blocked handing the stalled writer more results (its queue full): the loop never saw
    # the stop, and the sink ran past its drain timeout into the supervisor's SIGKILL. It now stops handing over,
    # waits for the writer up to worker.drain_timeout_s and exits; what the writer has not committed stays pending,
    # and a peer sink claims and publishes it (each decision once, with its overlay).
    sink, disk, results = slow_sink("stalled-stop", READ_COUNT + HEATMAP_QUEUE + 8)  # more than the writer holds
    client, keys = sink.runtime.client, sink.keys
    thread = start_thread(sink.run)
    try:
        assert disk.entered.wait(timeout=30)
        wait_until(lambda: sink.writer.jobs.full(), what="the writer's queue to fill")
        sink.runtime.stop.set()
        thread.join(timeout=worker_config.worker.drain_timeout_s + 10)  # a hang guard: drain_timeout_s 5 s
        assert not thread.is_alive(), "the sink did not exit while its writer was stalled"
        assert decisions_in(client, keys.decisions) == [] and client.dead_letters(keys) == []
        # none acknowledged: pending, or still unread when the writer took few at once and the queue filled early
        stats = client.group_stats(keys.results)[SINK_GROUP]
        assert (stats.pending, stats.lag) in {(len(results) - unread, unread) for unread in range(len(results))}
        peer = SinkWorker(make_runtime("sink", "peer"), "line-1")
        peer_thread = start_thread(peer.run)
        try:
            wait_until(lambda: len(decisions_in(client, keys.decisions)) == len(results), what="the peer's decisions")
        finally:
            peer.runtime.stop.set()
            peer_thread.join(timeout=30)
    finally:
        disk.gate.set()
        sink.runtime.stop.set()
        thread.join(timeout=30)
    _assert_each_published_once_with_its_heatmap(client, keys.decisions, results)


def test_a_stop_during_the_startup_walk_with_the_writer_stalled_exits(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]], worker_config: Config
) -> None:
    # On start the sink walks its own pending results, waiting (writer.flush) for the writer after each page: with the
    # disk stalled that wait ignored SIGTERM, and the sink ran into the supervisor's SIGKILL.
    sink, disk, results = slow_sink("restarted", 3)
    client, keys = sink.runtime.client, sink.keys
    assert len(client.read_new(keys.results, SINK_GROUP, "restarted", 10, None)) == 3  # its previous run's, pending
    thread = start_thread(sink.run)
    try:
        assert disk.entered.wait(timeout=30)
        sink.runtime.stop.set()
        thread.join(timeout=worker_config.worker.drain_timeout_s + 10)  # a hang guard: drain_timeout_s 5 s
        assert not thread.is_alive(), "the sink did not exit while its writer was stalled"
        assert client.group_stats(keys.results)[SINK_GROUP].pending == len(results)
    finally:
        _stop(sink, disk, thread)


def test_a_writer_hung_past_max_batch_duration_turns_the_sink_unhealthy_until_it_is_back(
    slow_sink: Callable[..., tuple[SinkWorker, StalledDisk, list[Decision]]], worker_config: Config
) -> None:
    # Past the bound the keeper stopped refreshing the heartbeat, but the sink's loop, not blocked while the writer's
    # queue had room, went on beating "ok": a sink whose disk hung for good (no overlay written, each failing frame's
    # decision out only after streams.max_deliveries claims, without heatmap) stayed healthy, unlike a hung scorer.
    data = worker_config.model_dump(mode="json")
    data["worker"]["max_batch_duration_s"] = 1.5
    sink, disk, _results = slow_sink("hung-health", 1, config_from_mapping(data))
    port = sink.runtime.server.port
    thread = start_thread(sink.run)
    try:
        assert disk.entered.wait(timeout=30)
        wait_until(lambda: status(port, "/healthz") == 503, timeout_s=1.5 + 4 * HEARTBEAT_TTL_S, what="503")
        assert status(port, "/livez") == 503
        disk.gate.set()  # the disk is back: the writer finishes, the loop beats again
        wait_until(lambda: status(port, "/healthz") == 200, timeout_s=10, what="/healthz to turn 200 again")
    finally:
        _stop(sink, disk, thread)
