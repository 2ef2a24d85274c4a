"""Record and replay: file round trip, recording a live line, replaying onto a candidate line and comparing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from pipeline.codec import encode_decision, encode_frame
from pipeline.messages import Decision
from pipeline.streams import LineKeys
from tests.workers.conftest import TinyLine
from tests.workers.helpers import frame_from_file, start_thread
from workers.lifecycle import WorkerRuntime
from workers.record import (
    RecordingError,
    RecordingWriter,
    ReplaySource,
    compare_decisions,
    read_recording,
    record_line,
)
from workers.replay import replay_and_compare
from workers.score import ModelSlot, ScoreWorker, load_model
from workers.sink import SinkWorker


def decision(frame_id: str, verdict: str, score: float, model_id: str = "m") -> Decision:
    return Decision.model_validate(
        {
            "frame_id": frame_id,
            "line_id": "l",
            "camera_id": "c",
            "verdict": verdict,
            "score": score,
            "model_id": model_id,
            "captured_at_ns": 1,
        }
    )


def test_comparison_counts_verdict_changes_and_score_shift() -> None:
    baseline = {"a": decision("a", "pass", 1.0), "b": decision("b", "fail", 3.0), "c": decision("c", "pass", 1.0)}
    candidate = {"a": decision("a2", "pass", 1.5, "n"), "b": decision("b2", "pass", 2.0, "n")}
    report = compare_decisions(baseline, candidate)
    assert report["frames_compared"] == 2
    assert report["missing_in_candidate"] == 1
    assert report["transitions"] == {"fail->pass": 1, "pass->pass": 1}
    assert report["verdict_changes"] == 1
    assert report["changed_frames"][0]["frame_id"] == "b"
    assert report["mean_abs_score_change"] == pytest.approx(0.75)
    assert report["candidate_models"] == ["n"]
    assert report["baseline_scores"]["max"] == 3.0


def test_recording_round_trip_and_bad_files(tiny_line: TinyLine, tmp_path: Path) -> None:
    frame = frame_from_file(tiny_line.good_images[0], captured_at_ns=123_000_000_000)
    writer = RecordingWriter(tmp_path / "rec.lir", "line-1")
    writer.frame("1-0", encode_frame(frame))
    writer.decision(encode_decision(decision(frame.frame_id, "pass", 1.0)))
    writer.close()
    recording = read_recording(tmp_path / "rec.lir")
    assert recording.line_id == "line-1"
    assert list(recording.frames()) == [frame] and recording.frame_count == 1
    assert recording.decisions[frame.frame_id].verdict == "pass"
    replayed = list(ReplaySource("x", tmp_path / "rec.lir", speed=0, run_id="r1").captures())
    assert replayed[0].data == frame.data
    assert replayed[0].metadata["replay_of"] == frame.frame_id
    assert replayed[0].captured_at_ns > frame.captured_at_ns  # re-stamped at send time
    (tmp_path / "junk.lir").write_bytes(b"\x93\x01\x02")
    with pytest.raises(RecordingError, match="not a lineinspect-recording"):
        read_recording(tmp_path / "junk.lir")


def test_record_line_saves_new_frames_with_their_decisions(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    runtime = make_runtime("record", "r1")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    client.publish(keys.frames, encode_frame(frame_from_file(tiny_line.good_images[0])))  # before recording: skipped
    frames = [frame_from_file(tiny_line.good_images[i]) for i in range(3)]
    counts: list[tuple[int, int, int]] = []
    started = threading.Event()
    recorder = start_thread(
        lambda: counts.append(
            record_line(client, keys, tmp_path / "rec.lir", threading.Event(), 3, settle_s=30, started=started)
        )
    )
    assert started.wait(timeout=30)
    for frame in frames:
        client.publish(keys.frames, encode_frame(frame))
    for frame in frames:
        client.publish(keys.decisions, encode_decision(decision(frame.frame_id, "fail", 9.0)))
    recorder.join(timeout=60)
    assert counts == [(3, 3, 0)]
    recording = read_recording(tmp_path / "rec.lir")
    assert [f.frame_id for f in recording.frames()] == [f.frame_id for f in frames]
    assert set(recording.decisions) == {f.frame_id for f in frames}


def test_replay_onto_a_candidate_line_reports_against_the_recording(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    from models.artifact import read_manifest

    frames = [frame_from_file(path) for path in tiny_line.good_images + tiny_line.defect_images]
    writer = RecordingWriter(tmp_path / "rec.lir", "line-1")
    for index, frame in enumerate(frames):
        writer.frame(f"{index + 1}-0", encode_frame(frame))
        writer.decision(encode_decision(decision(frame.frame_id, "pass", 0.0, "production")))
    writer.close()

    scorer_runtime, sink_runtime = make_runtime("score", "w1"), make_runtime("sink", "s1")
    keys = LineKeys(scorer_runtime.config.streams.prefix, "shadow")
    slot = ModelSlot(scorer_runtime, keys, load_model("cpu"), tiny_line.other_model_dir)
    threads = [
        start_thread(ScoreWorker(scorer_runtime, "shadow", slot).run),
        start_thread(SinkWorker(sink_runtime, "shadow").run),
    ]
    report = replay_and_compare(make_runtime("replay", "rp"), tmp_path / "rec.lir", "shadow", 0.0, "run1", 120.0)
    for runtime in (scorer_runtime, sink_runtime):
        runtime.stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert report["frames_replayed"] == len(frames)
    assert report["frames_compared"] == len(frames)
    assert not report["timed_out"]
    assert report["candidate_models"] == [str(read_manifest(tiny_line.other_model_dir)["model_id"])]
    assert report["baseline_models"] == ["production"]
    assert sum(report["transitions"].values()) == len(frames)
    assert report["candidate_scores"]["count"] == len(frames)


def test_the_report_says_which_flips_are_false_alarms_and_misses_and_with_what_thresholds() -> None:
    def labelled(frame_id: str, verdict: str, score: float, label: str, threshold: float) -> Decision:
        return decision(frame_id, verdict, score).model_copy(update={"metadata": {"label": label},
                                                                     "threshold": threshold})  # fmt: skip

    baseline = {"g": labelled("g", "pass", 3.1, "good", 3.2), "d": labelled("d", "fail", 5.0, "defect", 3.2),
                "e": labelled("e", "pass", 1.0, "good", 3.2)}  # fmt: skip
    stale = decision("e2", "error", 0.0).model_copy(update={"score": None, "error_reason": "stale"})
    candidate = {"g": labelled("g2", "fail", 3.0, "good", 2.7), "d": labelled("d2", "fail", 4.0, "defect", 2.7),
                 "e": stale}  # fmt: skip
    report = compare_decisions(baseline, candidate)
    assert report["transitions_by_label"] == {"defect": {"fail->fail": 1}, "good": {"pass->error": 1,
                                                                                    "pass->fail": 1}}  # fmt: skip
    assert (report["baseline_thresholds"], report["candidate_thresholds"]) == ([3.2], [2.7])
    assert report["candidate_errors"] == {"stale": 1} and report["changed_frames_truncated"] is False


def test_a_recorder_skips_entries_that_are_not_frames_and_goes_on(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    runtime = make_runtime("record", "r2")
    client, keys = runtime.client, LineKeys(runtime.config.streams.prefix, "line-1")
    frames = [frame_from_file(tiny_line.good_images[i]) for i in range(2)]
    counts: list[tuple[int, int, int]] = []
    started = threading.Event()
    recorder = start_thread(
        lambda: counts.append(
            record_line(client, keys, tmp_path / "rec.lir", threading.Event(), 2, settle_s=30, started=started)
        )
    )
    assert started.wait(timeout=30)
    client.publish(keys.frames, encode_frame(frames[0]))
    client.publish(keys.frames, b"\xc1garbage")  # the pipeline dead-letters it; the recording leaves it out
    client.publish(keys.frames, encode_frame(frames[1]))
    for frame in frames:
        client.publish(keys.decisions, encode_decision(decision(frame.frame_id, "pass", 1.0)))
    recorder.join(timeout=60)
    assert counts == [(2, 2, 1)]
    assert [f.frame_id for f in read_recording(tmp_path / "rec.lir").frames()] == [f.frame_id for f in frames]


def test_replay_refuses_the_recorded_line_and_says_when_a_recording_was_cut(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    frame = frame_from_file(tiny_line.good_images[0])
    writer = RecordingWriter(tmp_path / "rec.lir", "line-1")
    writer.frame("1-0", encode_frame(frame))
    writer.decision(encode_decision(decision(frame.frame_id, "pass", 1.0)))
    writer.close()
    runtime = make_runtime("replay", "rp2")
    with pytest.raises(RecordingError, match="was recorded on line line-1"):
        replay_and_compare(runtime, tmp_path / "rec.lir", None, 0.0, "run2", 1.0)
    with pytest.raises(RecordingError, match="was recorded on line line-1"):
        replay_and_compare(runtime, tmp_path / "rec.lir", "line-1", 0.0, "run2", 1.0)
    cut = tmp_path / "cut.lir"
    cut.write_bytes((tmp_path / "rec.lir").read_bytes()[:-10])
    assert read_recording(cut).truncated_bytes > 0 and read_recording(tmp_path / "rec.lir").truncated_bytes == 0
    report = replay_and_compare(make_runtime("replay", "rp3"), cut, "nobody-scores-this", 0.0, "run3", 0.5)
    assert report["recording_truncated"] and report["timed_out"]
    assert any("was cut" in warning for warning in report["warnings"])
    assert any("is a scoring worker and a sink running" in warning for warning in report["warnings"])


def test_a_recording_is_read_one_frame_at_a_time(tiny_line: TinyLine, tmp_path: Path) -> None:
    """A day of frames does not fit in memory: scanning keeps the decisions and a count, frames stay in the file."""
    import tracemalloc

    frame = frame_from_file(tiny_line.good_images[0])
    big = frame.model_copy(update={"data": frame.data + bytes(2_000_000)})  # ~2 MB a frame, 40 of them
    writer = RecordingWriter(tmp_path / "rec.lir", "line-1")
    for index in range(40):
        writer.frame(f"{index + 1}-0", encode_frame(big.model_copy(update={"frame_id": f"f{index}"})))
        writer.decision(encode_decision(decision(f"f{index}", "pass", 1.0)))
    writer.close()
    tracemalloc.start()
    recording = read_recording(tmp_path / "rec.lir")
    sent = sum(1 for _ in ReplaySource("x", tmp_path / "rec.lir", speed=0).captures())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert recording.frame_count == sent == 40 and len(recording.decisions) == 40
    assert peak < 20_000_000  # a few frames at a time, not the 80 MB file
    bad = tmp_path / "bad.lir"
    RecordingWriter(bad, "line-1").close()  # the header alone
    with bad.open("ab") as handle:
        handle.write(msgpack.packb({"kind": "frame", "payload": 7}))
    with pytest.raises(RecordingError, match="damaged entry"):
        read_recording(bad)
