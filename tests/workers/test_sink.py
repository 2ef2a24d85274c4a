"""Sink against a real Redis: one published decision per frame, heatmaps for failures, metrics, retention."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models.heatmap import enlargement
from pipeline.codec import encode_decision, encode_frame, encode_pixels
from pipeline.messages import Decision, Frame, StageTimings, now_ns, pack_anomaly_map
from pipeline.streams import SINK_GROUP
from tests.workers.helpers import decisions_in, start_thread, wait_until
from workers.heatmaps import HeatmapStore, expired_files
from workers.lifecycle import WorkerRuntime
from workers.sink import SinkWorker


def result_for(frame: Frame, entry_id: str, verdict: str, with_map: bool) -> Decision:
    size, data = pack_anomaly_map(np.linspace(0, 2, 32 * 32, dtype=np.float32).reshape(32, 32))
    return Decision.model_validate(
        {
            "frame_id": frame.frame_id,
            "line_id": "line-1",
            "camera_id": "cam0",
            "verdict": verdict,
            "score": 1.5,
            "threshold": 1.0,
            "model_id": "m1",
            "timings": StageTimings(backbone_s=0.1),
            "captured_at_ns": now_ns(),
            "decided_at_ns": now_ns(),
            "frame_entry_id": entry_id,
            "map_size": size if with_map else None,
            "anomaly_map": data if with_map else None,
        }
    )


def test_each_frame_is_published_once_with_a_heatmap_for_failures(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s1")
    sink = SinkWorker(runtime, "line-1")
    client, keys = runtime.client, sink.keys
    pixels, extra = encode_pixels(np.full((48, 64, 3), 90, dtype=np.uint8), "png")
    frames = [
        Frame(
            line_id="line-1",
            camera_id="cam0",
            frame_id=f"f{i}",
            sequence=i,
            captured_at_ns=now_ns(),
            encoding="png",
            data=pixels,
            **extra,
        )
        for i in range(3)
    ]
    entry_ids = [client.publish(keys.frames, encode_frame(frame)) for frame in frames]
    results = [
        result_for(frames[0], entry_ids[0], "fail", with_map=True),
        result_for(frames[1], entry_ids[1], "pass", with_map=False),
        result_for(frames[0], entry_ids[0], "fail", with_map=True),  # redelivered and scored twice
        result_for(frames[2], "0-1", "fail", with_map=True),  # its frame was trimmed away
    ]
    client.ensure_group(keys.results, SINK_GROUP)
    for result in results:
        client.publish(keys.results, encode_decision(result))
    client.publish(keys.results, b"not a decision")
    sink.handle(client.read_new(keys.results, SINK_GROUP, "s1", 100, None))
    sink.writer.flush()

    published = decisions_in(client, keys.decisions)
    assert sorted(d.frame_id for d in published) == ["f0", "f1", "f2"]
    assert all(d.anomaly_map is None and d.published_at_ns > 0 for d in published)
    by_frame = {d.frame_id: d for d in published}
    assert by_frame["f1"].heatmap_ref is None
    heatmap = cv2.imread(str(by_frame["f0"].heatmap_ref))  # drawn over the frame (enlarged), a caption below it
    factor = enlargement(48, 64)
    assert heatmap is not None and heatmap.shape[1] == 64 * factor and heatmap.shape[0] > 48 * factor
    grey_canvas = cv2.imread(str(by_frame["f2"].heatmap_ref))  # its frame trimmed: over a canvas of the map's size
    assert grey_canvas is not None and grey_canvas.shape[1] == 32 * enlargement(32, 32)
    assert [letter["reason"] for letter in client.dead_letters(keys)] == ["not_msgpack"]
    assert client.group_stats(keys.results)[SINK_GROUP].pending == 0
    assert client.length(keys.results) == 0  # acknowledged results (with their maps) are deleted
    value = runtime.metrics.registry.get_sample_value
    assert value("lineinspect_frames_total", {"line": "line-1", "verdict": "fail"}) == 2
    assert value("lineinspect_duplicate_decisions_total", {"line": "line-1"}) == 1
    assert value("lineinspect_end_to_end_latency_seconds_count", {"line": "line-1"}) == 3
    assert value("lineinspect_dead_letters_total", {"line": "line-1", "reason": "not_msgpack"}) == 1


def test_retention_removes_too_old_then_oldest_beyond_the_limit() -> None:
    now = 1000.0
    files = [(Path(f"{name}.png"), mtime) for name, mtime in [("a", 990), ("b", 999), ("c", 500), ("d", 995)]]
    assert expired_files(files, now, max_files=2, max_age_s=100) == [Path("c.png"), Path("a.png")]
    assert expired_files(files, now, max_files=10, max_age_s=1000) == []


def test_heatmap_store_prunes_files_on_disk(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_files=2, max_age_s=3600, prune_every_s=0)
    for index in range(4):
        path = store.write(store.path_for("line/1", f"frame {index}"), np.zeros((16, 16, 3), np.uint8), np.ones((8, 8)),
                           0.5, 0.7)  # fmt: skip
        os.utime(path, (time.time() - 100 + index, time.time() - 100 + index))
    assert store.maybe_prune(now_monotonic=0.0) == 2
    kept = sorted(p.name for p in store.path_for("line/1", "frame 0").parent.iterdir())
    assert kept == sorted(store.path_for("line/1", f"frame {index}").name for index in (2, 3))


def _frames_with_results(sink: SinkWorker, count: int, verdict: str = "fail") -> tuple[list[Frame], list[Decision]]:
    """``count`` frames on the frames stream and a scoring result for each (with a map when ``verdict`` is fail)."""
    client, keys = sink.runtime.client, sink.keys
    pixels, extra = encode_pixels(np.full((40, 40, 3), 60, dtype=np.uint8), "png")
    frames = [
        Frame(
            line_id="line-1",
            camera_id="cam0",
            frame_id=f"{verdict}-{i}",
            sequence=i,
            captured_at_ns=now_ns(),
            encoding="png",
            data=pixels,
            **extra,
        )
        for i in range(count)
    ]
    entry_ids = [client.publish(keys.frames, encode_frame(frame)) for frame in frames]
    results = [
        result_for(frame, entry_id, verdict, with_map=verdict == "fail")
        for frame, entry_id in zip(frames, entry_ids, strict=True)
    ]
    return frames, results


def _deliver(sink: SinkWorker, results: list[Decision]) -> int:
    client, keys = sink.runtime.client, sink.keys
    client.ensure_group(keys.results, SINK_GROUP)
    for result in results:
        client.publish(keys.results, encode_decision(result))
    return sink.handle(client.read_new(keys.results, SINK_GROUP, sink.runtime.name, 100, None))


def test_writer_writes_each_failed_frames_overlay_once_across_redeliveries(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    runtime = make_runtime("sink", "s-once")
    sink = SinkWorker(runtime, "line-1")
    _frames, results = _frames_with_results(sink, 5)
    assert _deliver(sink, results + results[:2]) == 0  # failures are published by the writer, not here
    sink.writer.flush()
    _deliver(sink, results[1:4])  # redelivered after their decisions (and overlays) are out
    sink.writer.flush()

    published = decisions_in(runtime.client, sink.keys.decisions)
    assert sorted(d.frame_id for d in published) == [f"fail-{i}" for i in range(5)]
    paths = {Path(str(d.heatmap_ref)) for d in published}
    assert paths == set((sink.config.sink.heatmap_dir / "line-1").iterdir())
    overlays = [cv2.imread(str(path)) for path in paths]
    assert all(overlay is not None and overlay.shape[1] == 40 * enlargement(40, 40) for overlay in overlays)
    value = runtime.metrics.registry.get_sample_value
    assert value("lineinspect_heatmaps_written_total", {"line": "line-1"}) == 5
    assert value("lineinspect_duplicate_decisions_total", {"line": "line-1"}) == 5
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0
    assert runtime.client.length(sink.keys.results) == 0


def test_an_overlay_left_by_a_crashed_delivery_is_not_drawn_again(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s-crash")
    sink = SinkWorker(runtime, "line-1")
    frames, results = _frames_with_results(sink, 1)
    path = sink.heatmaps.path_for("line-1", frames[0].frame_id, results[0].frame_entry_id)
    path.parent.mkdir(parents=True)
    cv2.imwrite(str(path), np.zeros((8, 8, 3), np.uint8))  # written, then the sink died before publishing
    _deliver(sink, results)
    sink.writer.flush()
    (published,) = decisions_in(runtime.client, sink.keys.decisions)
    assert published.heatmap_ref == str(path)
    overlay = cv2.imread(str(path))
    assert overlay is not None and overlay.shape == (8, 8, 3)
    assert runtime.metrics.registry.get_sample_value("lineinspect_heatmaps_written_total", {"line": "line-1"}) is None


def test_passes_are_published_while_the_writer_is_busy(
    make_runtime: Callable[..., WorkerRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_runtime("sink", "s-busy")
    sink = SinkWorker(runtime, "line-1")
    release = threading.Event()
    original_write = sink.heatmaps.write

    def held_write(*args: Any) -> Path:
        release.wait()
        return original_write(*args)

    monkeypatch.setattr(sink.heatmaps, "write", held_write)
    _fail_frames, failures = _frames_with_results(sink, 2)
    _pass_frames, passes = _frames_with_results(sink, 3, verdict="pass")
    assert _deliver(sink, [failures[0], *passes, failures[1]]) == 3
    published = decisions_in(runtime.client, sink.keys.decisions)
    assert sorted(d.frame_id for d in published) == ["pass-0", "pass-1", "pass-2"]
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 2  # acked only once written
    release.set()
    sink.writer.flush()
    assert len(decisions_in(runtime.client, sink.keys.decisions)) == 5
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0


def test_writer_applies_retention(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s-retain", config=None)
    sink = SinkWorker(runtime, "line-1")
    sink.heatmaps.max_files, sink.heatmaps.prune_every_s = 2, 0.0
    _frames, results = _frames_with_results(sink, 5)
    for result in results:  # one per read, so the writer prunes between them
        _deliver(sink, [result])
        sink.writer.flush()
    assert len(list((sink.config.sink.heatmap_dir / "line-1").iterdir())) == 2
    assert len(decisions_in(runtime.client, sink.keys.decisions)) == 5


def test_drain_finishes_the_writers_queue(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s-drain")
    sink = SinkWorker(runtime, "line-1")
    _frames, results = _frames_with_results(sink, 4)
    runtime.client.ensure_group(sink.keys.results, SINK_GROUP)
    for result in results:
        runtime.client.publish(sink.keys.results, encode_decision(result))
    thread = start_thread(sink.run)
    wait_until(lambda: runtime.client.group_stats(sink.keys.results)[SINK_GROUP].lag == 0, what="results read")
    runtime.stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(decisions_in(runtime.client, sink.keys.decisions)) == 4
    assert runtime.client.group_stats(sink.keys.results)[SINK_GROUP].pending == 0


def test_a_result_without_a_payload_field_is_not_a_message_not_trimmed(
    make_runtime: Callable[..., WorkerRuntime],
) -> None:
    """A results entry someone wrote without the ``payload`` field holds no decision; read as trimmed it was
    dead-lettered entry_trimmed and counted as a result lost to trimming, which the results stream never does."""
    runtime = make_runtime("sink", "s-fields")
    sink = SinkWorker(runtime, "line-1")
    client, keys = runtime.client, sink.keys
    frames, results = _frames_with_results(sink, 1, verdict="pass")
    client.ensure_group(keys.results, SINK_GROUP)
    misnamed_id = client.redis.xadd(keys.results, {"decision": encode_decision(results[0])}).decode()
    client.publish(keys.results, encode_decision(results[0]))
    assert sink.handle(client.read_new(keys.results, SINK_GROUP, "s-fields", 100, None)) == 1
    (letter,) = client.dead_letters(keys)
    assert (letter["reason"], letter["source_entry_id"]) == ("not_a_message", misnamed_id)
    assert "no 'payload' field" in letter["detail"] and "decision" in letter["detail"]
    assert client.group_stats(keys.results)[SINK_GROUP].pending == 0 and client.length(keys.results) == 0
    value = runtime.metrics.registry.get_sample_value
    assert value("lineinspect_dead_letters_total", {"line": "line-1", "reason": "not_a_message"}) == 1
    assert value("lineinspect_dead_letters_total", {"line": "line-1", "reason": "entry_trimmed"}) is None
    assert [d.frame_id for d in decisions_in(client, keys.decisions)] == [frames[0].frame_id]


def test_the_sink_exports_frames_trimmed_before_a_scorer_read_them(make_runtime: Callable[..., WorkerRuntime]) -> None:
    runtime = make_runtime("sink", "s-trimmed")
    sink = SinkWorker(runtime, "line-1")
    client, keys = runtime.client, sink.keys
    if int(client.redis.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("Redis before 7 counts no entries added")
    client.ensure_group(keys.frames, "scorers")
    client.ensure_group(keys.results, SINK_GROUP)
    client.publish(keys.frames, b"frame-0")
    client.read_new(keys.frames, "scorers", "score-a", count=1, block_ms=None)
    for index in range(1, 11):  # a camera outrunning a stalled scorer: 7 frames trimmed before any scorer read them
        client.redis.xadd(keys.frames, {"payload": f"frame-{index}".encode()}, maxlen=3, approximate=False)
    client.read_new(keys.frames, "scorers", "score-a", count=10, block_ms=None)
    sink._housekeeping()
    value = runtime.metrics.registry.get_sample_value
    assert value("lineinspect_stream_trimmed_unread_total", {"stream": keys.frames, "group": "scorers"}) == 7
    assert value("lineinspect_stream_trimmed_unread_total", {"stream": keys.results, "group": SINK_GROUP}) is None
