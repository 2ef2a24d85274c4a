"""Sink against a real Redis when results misbehave: each result is handled on its own, a reused frame_id never
shares a heatmap file, a result that keeps failing ends in the dead-letter stream with its decision out."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.heatmap import enlargement
from pipeline.codec import encode_decision, encode_frame, encode_pixels
from pipeline.messages import MAX_ID_CHARS, Decision, Frame, now_ns
from pipeline.streams import SINK_GROUP
from tests.workers.helpers import decisions_in, start_thread, wait_until
from tests.workers.test_sink import result_for
from workers.lifecycle import WorkerRuntime
from workers.sink import HeatmapJob, SinkWorker


def _frame(sink: SinkWorker, frame_id: str, grey: int = 60) -> tuple[Frame, str]:
    """A frame on the line's frames stream, and its entry id."""
    pixels, extra = encode_pixels(np.full((40, 40, 3), grey, dtype=np.uint8), "png")
    frame = Frame(
        line_id="line-1",
        camera_id="cam0",
        frame_id=frame_id,
        sequence=0,
        captured_at_ns=now_ns(),
        encoding="png",
        data=pixels,
        **extra,
    )
    return frame, sink.runtime.client.publish(sink.keys.frames, encode_frame(frame))


def _failed(sink: SinkWorker, frame_id: str, grey: int = 60) -> Decision:
    frame, entry_id = _frame(sink, frame_id, grey)
    return result_for(frame, entry_id, "fail", with_map=True)


def _deliver(sink: SinkWorker, results: Sequence[Decision | bytes]) -> None:
    client, keys = sink.runtime.client, sink.keys
    client.ensure_group(keys.results, SINK_GROUP)
    for result in results:
        client.publish(keys.results, result if isinstance(result, bytes) else encode_decision(result))
    sink.handle(client.read_new(keys.results, SINK_GROUP, sink.runtime.name, 100, None))
    sink.writer.flush()


def _by_frame(sink: SinkWorker) -> dict[str, Decision]:
    return {decision.frame_id: decision for decision in decisions_in(sink.runtime.client, sink.keys.decisions)}


# -- one result never holds up the others --------------------------------------------------------------------------
def test_a_frame_id_too_long_for_a_file_name_holds_up_nothing(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s-long")
    sink = SinkWorker(runtime, "line-1")
    long_id = "cam1-" + "9" * (MAX_ID_CHARS - 5)  # the longest id the wire takes: with ".png", over 255 bytes
    _deliver(sink, [_failed(sink, long_id), _failed(sink, "defect-1")])

    by_frame = _by_frame(sink)
    assert sorted(by_frame) == sorted([long_id, "defect-1"])
    for decision in by_frame.values():
        overlay = cv2.imread(str(decision.heatmap_ref))
        assert overlay is not None and overlay.shape[1] == 40 * enlargement(40, 40)  # the frame enlarged, a caption
        assert Path(str(decision.heatmap_ref)).parent == sink.config.sink.heatmap_dir / "line-1"
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0


def test_a_malformed_anomaly_map_is_dead_lettered_and_the_rest_published(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    runtime = make_runtime("sink", "s-malformed")
    sink = SinkWorker(runtime, "line-1")
    valid = [_failed(sink, f"fail-{index}") for index in range(8)]
    malformed = _failed(sink, "bad-map").model_copy(
        update={"map_size": 8, "anomaly_map": np.ones(65, np.float16).tobytes()}
    )
    _deliver(sink, [*valid[:4], malformed, *valid[4:]])

    by_frame = _by_frame(sink)
    assert sorted(by_frame) == sorted([*(f"fail-{index}" for index in range(8)), "bad-map"])
    assert all(by_frame[f"fail-{index}"].heatmap_ref for index in range(8))
    bad = by_frame["bad-map"]
    assert bad.verdict == "fail" and bad.heatmap_ref is None  # the verdict still reaches the line
    assert bad.metadata["heatmap_error"] == "invalid_anomaly_map"
    (letter,) = runtime.client.dead_letters(sink.keys)
    assert letter["reason"] == "invalid_anomaly_map" and letter["frame_id"] == "bad-map"
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0
    assert runtime.client.length(sink.keys.results) == 0


def test_an_overlay_that_cannot_be_written_leaves_its_decision_published_flagged(
    make_runtime: Callable[..., WorkerRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime("sink", "s-writefail")
    sink = SinkWorker(runtime, "line-1")
    original_write = sink.heatmaps.write

    def failing_write(path: Path, *args: object) -> Path:
        if path.name.startswith("unlucky@"):
            raise cv2.error("drawing failed")  # not an OSError: anything may go wrong in drawing
        return original_write(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sink.heatmaps, "write", failing_write)
    _deliver(sink, [_failed(sink, "lucky-1"), _failed(sink, "unlucky"), _failed(sink, "lucky-2")])

    by_frame = _by_frame(sink)
    assert sorted(by_frame) == ["lucky-1", "lucky-2", "unlucky"]
    assert by_frame["unlucky"].heatmap_ref is None
    assert by_frame["unlucky"].metadata["heatmap_error"] == "heatmap_failed"
    assert by_frame["lucky-1"].heatmap_ref and "heatmap_error" not in by_frame["lucky-1"].metadata
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0
    assert runtime.metrics.heatmap_failures.labels("line-1")._value.get() == 1  # the dashboard can see it


def test_a_result_that_keeps_failing_is_dead_lettered_and_restart_does_not_loop(
    make_runtime: Callable[..., WorkerRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result the writer crashes on (e.g. a bug) stays pending; the startup re-read of the sink's own pending
    results must end, and after ``streams.max_deliveries`` the decision goes out without heatmap."""
    runtime = make_runtime("sink", "s-poison")
    sink = SinkWorker(runtime, "line-1")
    client, keys = runtime.client, sink.keys
    poison, healthy = _failed(sink, "poison"), _failed(sink, "healthy")
    original = sink.write_and_publish

    def crashing_write_and_publish(jobs: Sequence[HeatmapJob]) -> int:
        if any(job.decision.frame_id == "poison" for job in jobs):
            msg = "writer crashed on this result"
            raise RuntimeError(msg)
        return original(jobs)

    monkeypatch.setattr(sink, "write_and_publish", crashing_write_and_publish)
    client.ensure_group(keys.results, SINK_GROUP)
    client.publish(keys.results, encode_decision(poison))
    client.read_new(keys.results, SINK_GROUP, runtime.name, 10, None)  # delivered, then the sink "died"
    client.publish(keys.results, encode_decision(healthy))

    new_reads = threading.Event()
    original_read_new = client.read_new

    def read_new(*args: object, **kwargs: object) -> object:
        new_reads.set()
        return original_read_new(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client, "read_new", read_new)
    thread = start_thread(sink.run)
    wait_until(new_reads.is_set, timeout_s=10, what="the sink to get past its own pending results")
    wait_until(lambda: "healthy" in _by_frame(sink), timeout_s=10, what="the healthy result's decision")
    wait_until(lambda: "poison" in _by_frame(sink), timeout_s=20, what="the poison result's decision")
    runtime.stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()

    poisoned = _by_frame(sink)["poison"]
    assert poisoned.verdict == "fail" and poisoned.heatmap_ref is None
    assert poisoned.metadata["heatmap_error"] == "max_deliveries_exceeded"
    assert [letter["reason"] for letter in client.dead_letters(keys)] == ["max_deliveries_exceeded"]
    assert client.group_stats(keys.results)[SINK_GROUP].pending == 0


# -- a frame_id reused by another frame -----------------------------------------------------------------------------
def test_a_different_frame_reusing_a_frame_id_gets_its_own_decision_and_overlay(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    runtime = make_runtime("sink", "s-dup")
    sink = SinkWorker(runtime, "line-1")
    first, second = _failed(sink, "dup-1", grey=30), _failed(sink, "dup-1", grey=220)
    _deliver(sink, [first])
    (first_published,) = decisions_in(runtime.client, sink.keys.decisions)
    first_overlay = Path(str(first_published.heatmap_ref)).read_bytes()

    _deliver(sink, [second, first])  # another frame with the same id, and a redelivery of the first
    published = decisions_in(runtime.client, sink.keys.decisions)
    assert [decision.frame_entry_id for decision in published] == [first.frame_entry_id, second.frame_entry_id]
    assert "frame_id_reused" not in published[0].metadata
    assert published[1].metadata["frame_id_reused"] is True
    assert published[0].heatmap_ref != published[1].heatmap_ref
    assert Path(str(published[0].heatmap_ref)).read_bytes() == first_overlay  # first frame's overlay untouched
    second_overlay = cv2.imread(str(published[1].heatmap_ref))
    assert second_overlay is not None and second_overlay.shape[1] == 40 * enlargement(40, 40)
    value = runtime.metrics.registry.get_sample_value
    assert value("lineinspect_duplicate_decisions_total", {"line": "line-1"}) == 1  # only the real redelivery


def test_a_pass_then_a_defect_under_one_frame_id_both_reach_the_line(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    runtime = make_runtime("sink", "s-dup-pass")
    sink = SinkWorker(runtime, "line-1")
    good_frame, good_entry = _frame(sink, "dup-1")
    _deliver(sink, [result_for(good_frame, good_entry, "pass", with_map=False)])
    _deliver(sink, [_failed(sink, "dup-1", grey=220)])
    verdicts = [decision.verdict for decision in decisions_in(runtime.client, sink.keys.decisions)]
    assert verdicts == ["pass", "fail"]
