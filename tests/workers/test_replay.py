"""Replay: a recording pushed through a candidate line, each recorded frame compared on its own (frame ids repeat),
and a report that says what an engineer must know (cut, old format, empty, stopped, nobody scoring)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from pipeline.codec import encode_decision, encode_frame
from pipeline.messages import Decision
from pipeline.streams import LineKeys
from tests.workers.conftest import TinyLine
from tests.workers.helpers import frame_from_file, start_thread
from tests.workers.processes import REPO_ROOT
from tests.workers.recordings import (
    decision_for,
    stream_ids,
    tiny_frame,
    write_recording,
    write_v1_recording,
)
from workers.lifecycle import WorkerRuntime
from workers.record import DecisionSummary, RecordingError, RecordingWriter, ReplaySource, summarise
from workers.replay import compare_decisions, replay_and_compare
from workers.score import ModelSlot, ScoreWorker, load_model, manifest_model_id
from workers.sink import SinkWorker


def replay(
    runtime: WorkerRuntime, path: Path, line_id: str | None, speed: float, run_id: str, timeout_s: float
) -> dict[str, Any]:
    """What ``lineinspect replay`` does once its runtime is up (it reads the recording before)."""
    return replay_and_compare(runtime, ReplaySource("replay", path, speed, run_id=run_id), line_id, timeout_s)


def summaries(decisions: dict[int, Decision]) -> dict[int, DecisionSummary]:
    return {number: summarise(decision) for number, decision in decisions.items()}


def test_comparison_counts_verdict_changes_and_score_shift() -> None:
    baseline = {1: decision_for("a", "pass", 1.0), 2: decision_for("b", "fail", 3.0), 3: decision_for("c", "pass", 1.0)}
    candidate = {1: decision_for("a2", "pass", 1.5, model_id="n"), 2: decision_for("b2", "pass", 2.0, model_id="n")}
    report = compare_decisions(summaries(baseline), summaries(candidate), ["1-0", "2-0", "3-0"])
    assert report["frames_compared"] == 2
    assert report["missing_in_candidate"] == 1
    assert report["transitions"] == {"fail->pass": 1, "pass->pass": 1}
    assert report["verdict_changes"] == 1
    changed = {"frame": 2, "frame_id": "b", "entry_id": "2-0", "baseline": "fail", "candidate": "pass",
               "baseline_score": 3.0, "candidate_score": 2.0}  # fmt: skip
    assert [{key: c[key] for key in changed} for c in report["changed_frames"]] == [changed]
    assert report["mean_abs_score_change"] == pytest.approx(0.75)
    assert report["candidate_models"] == ["n"]
    assert report["baseline_scores"]["max"] == 3.0


def test_frames_that_share_a_frame_id_are_compared_one_by_one() -> None:
    """Four recorded frames, one frame id: four comparisons, each changed one listed with its number."""
    baseline = {n: decision_for("cam0-1", "pass" if n % 2 else "fail", float(n)) for n in range(1, 5)}
    candidate = {n: decision_for(f"new-{n}", "pass", float(n)) for n in range(1, 5)}
    report = compare_decisions(summaries(baseline), summaries(candidate), ["1-0", "2-0", "3-0", "4-0"])
    assert report["frames_compared"] == 4 and report["transitions"] == {"fail->pass": 2, "pass->pass": 2}
    assert [(c["frame"], c["frame_id"], c["entry_id"]) for c in report["changed_frames"]] == [
        (2, "cam0-1", "2-0"),
        (4, "cam0-1", "4-0"),
    ]
    assert report["baseline_scores"]["count"] == 4


def test_the_report_says_which_flips_are_false_alarms_and_misses_and_with_what_thresholds() -> None:
    def labelled(frame_id: str, verdict: str, score: float, label: str, threshold: float) -> Decision:
        return decision_for(frame_id, verdict, score, metadata={"label": label}, threshold=threshold)

    baseline = {1: labelled("g", "pass", 3.1, "good", 3.2), 2: labelled("d", "fail", 5.0, "defect", 3.2),
                3: labelled("g", "pass", 1.0, "good", 3.2)}  # fmt: skip
    stale = decision_for("e2", "error", None)
    candidate = {1: labelled("g2", "fail", 3.0, "good", 2.7), 2: labelled("d2", "fail", 4.0, "defect", 2.7), 3: stale}
    report = compare_decisions(summaries(baseline), summaries(candidate))
    assert report["transitions_by_label"] == {"defect": {"fail->fail": 1}, "good": {"pass->error": 1,
                                                                                    "pass->fail": 1}}  # fmt: skip
    assert (report["baseline_thresholds"], report["candidate_thresholds"]) == ([3.2], [2.7])
    assert report["candidate_errors"] == {"stale": 1} and report["changed_frames_truncated"] is False
    assert report["changed_frames"][0]["entry_id"] is None  # no entry ids given


def test_each_changed_frame_says_why_with_its_thresholds_label_errors_and_heatmaps() -> None:
    """A verdict change is read against the threshold each model applied to that frame (a line promoted while it was
    recorded has two), its label, and the overlay of the side that failed it: the report names them per frame."""

    def decided(verdict: str, score: float | None, threshold: float, heatmap: str | None) -> Decision:
        decision = decision_for("g", verdict, score, metadata={"label": "good"}, threshold=threshold)
        return decision.model_copy(update={"heatmap_ref": heatmap})

    baseline = {1: decided("pass", 3.1, 3.2, None), 2: decided("fail", 3.3, 3.0, "/live/g@2-0.png"),
                3: decided("pass", 1.0, 3.0, None)}  # fmt: skip
    candidate = {1: decided("fail", 3.0, 2.7, "/shadow/g@9-0.png"), 2: decided("pass", 2.0, 2.7, None),
                 3: decided("error", None, 2.7, None)}  # fmt: skip
    changed = compare_decisions(summaries(baseline), summaries(candidate))["changed_frames"]
    why = ["frame", "label", "baseline_threshold", "candidate_threshold", "baseline_heatmap", "candidate_heatmap",
           "candidate_error_reason"]  # fmt: skip
    assert [[c[key] for key in why] for c in changed] == [
        [1, "good", 3.2, 2.7, None, "/shadow/g@9-0.png", None],
        [2, "good", 3.0, 2.7, "/live/g@2-0.png", None, None],
        [3, "good", 3.0, 2.7, None, None, "stale"],
    ]


def test_replay_onto_a_candidate_line_compares_every_recorded_frame(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """The recording reuses frame ids (two ids for eight frames, as a camera restarting would): every frame is
    still replayed, decided and compared on its own."""
    from models.artifact import read_manifest

    images = tiny_line.good_images + tiny_line.defect_images
    frames = [frame_from_file(path, frame_id=f"cam0-{index % 2}") for index, path in enumerate(images)]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            writer.frame(f"{number}-0", encode_frame(frame))
            writer.decision(f"{number}-0", encode_decision(decision_for(frame.frame_id, "pass", 0.0,
                                                                        model_id="production")))  # fmt: skip

    scorer_runtime, sink_runtime = make_runtime("score", "w1"), make_runtime("sink", "s1")
    keys = LineKeys(scorer_runtime.config.streams.prefix, "shadow")
    slot = ModelSlot(scorer_runtime, keys, load_model("cpu"), tiny_line.other_model_dir)
    threads = [
        start_thread(ScoreWorker(scorer_runtime, "shadow", slot).run),
        start_thread(SinkWorker(sink_runtime, "shadow").run),
    ]
    report = replay(make_runtime("replay", "rp"), tmp_path / "rec.lir", "shadow", 0.0, "run1", 120.0)
    for runtime in (scorer_runtime, sink_runtime):
        runtime.stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert report["frames_replayed"] == report["decisions_received"] == report["frames_compared"] == len(frames)
    assert report["frames_reusing_an_id"] == len(frames) - 2
    assert not report["timed_out"] and report["recording_complete"]
    # the only warnings: the tiny candidate's threshold rests on 2 good images, and the live model ("production")
    # has no directory on line-1's key to tell how its threshold was set
    weak, unknown = report["warnings"]
    assert "2 good images cannot resolve" in weak and "line line-1's model key is not set" in unknown
    assert report["candidate_line_model_dir"] == str(tiny_line.other_model_dir)
    assert report["candidate_models"] == [str(read_manifest(tiny_line.other_model_dir)["model_id"])]
    assert report["baseline_models"] == ["production"]
    assert sum(report["transitions"].values()) == len(frames)
    assert report["candidate_scores"]["count"] == len(frames)
    changed = report["changed_frames"]
    assert changed and {c["frame_id"] for c in changed} <= {"cam0-0", "cam0-1"}
    assert all(c["entry_id"] == f"{c['frame']}-0" for c in changed)
    failed = [c for c in changed if c["candidate"] == "fail"]
    assert failed and all(Path(c["candidate_heatmap"]).is_file() for c in failed)  # the candidate sink's overlays


def test_a_shadow_line_running_the_live_model_is_named_and_warned_about(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """The shadow line scores with the model its key names, whatever a later `score-worker --model` says: an engineer
    who tried another candidate there before, or started it on the live model, compared the live model with itself
    and read no verdict change as 'the candidate is as good'. The report names the line's model directory and warns."""
    from models.artifact import read_manifest

    live_id = str(read_manifest(tiny_line.other_model_dir)["model_id"])
    frames = [frame_from_file(path) for path in tiny_line.good_images[:3]]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            writer.frame(f"{number}-0", encode_frame(frame))
            writer.decision(f"{number}-0", encode_decision(decision_for(frame.frame_id, "pass", 0.0,
                                                                        model_id=live_id)))  # fmt: skip
    scorer_runtime, sink_runtime = make_runtime("score", "w3"), make_runtime("sink", "s3")
    keys = LineKeys(scorer_runtime.config.streams.prefix, "shadow3")
    slot = ModelSlot(scorer_runtime, keys, load_model("cpu"), tiny_line.other_model_dir)
    threads = [
        start_thread(ScoreWorker(scorer_runtime, "shadow3", slot).run),
        start_thread(SinkWorker(sink_runtime, "shadow3").run),
    ]
    report = replay(make_runtime("replay", "rp3"), tmp_path / "rec.lir", "shadow3", 0.0, "run3", 120.0)
    for runtime in (scorer_runtime, sink_runtime):
        runtime.stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert report["frames_compared"] == 3 and report["candidate_models"] == [live_id]
    assert report["candidate_line_model_dir"] == str(tiny_line.other_model_dir)
    assert any(f"line shadow3 scored with model {live_id}, which also decided the recording" in warning
               and str(tiny_line.other_model_dir) in warning for warning in report["warnings"])  # fmt: skip


def test_a_shadow_line_whose_key_names_a_model_its_scorers_did_not_load_is_warned_about(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """candidate_line_model_dir is read after the replay: a candidate promoted onto the shadow line that its scorers did
    not load (the load failed there, they had not swapped yet, or it was promoted after the last decision) was named
    as the line's model with no warning, while every decision came from the model before it."""
    import shutil

    from models.artifact import read_manifest

    scoring_id = str(read_manifest(tiny_line.model_dir)["model_id"])
    unloadable = tmp_path / "candidate"  # its manifest (another model's id) but none of its files: does not load
    unloadable.mkdir()
    shutil.copy(tiny_line.other_model_dir / "manifest.json", unloadable / "manifest.json")
    unloadable_id = manifest_model_id(unloadable)
    frames = [frame_from_file(path) for path in tiny_line.good_images[:2]]
    write_recording(tmp_path / "rec.lir", frames, [0.0, 0.0])
    scorer_runtime, sink_runtime = make_runtime("score", "w4"), make_runtime("sink", "s4")
    keys = LineKeys(scorer_runtime.config.streams.prefix, "shadow4")
    slot = ModelSlot(scorer_runtime, keys, load_model("cpu"), tiny_line.model_dir)
    scorer_runtime.client.set_model_dir(keys, str(unloadable))  # `lineinspect promote` (its check passed, say)
    threads = [
        start_thread(ScoreWorker(scorer_runtime, "shadow4", slot).run),
        start_thread(SinkWorker(sink_runtime, "shadow4").run),
    ]
    report = replay(make_runtime("replay", "rp4"), tmp_path / "rec.lir", "shadow4", 0.0, "run4", 120.0)
    for runtime in (scorer_runtime, sink_runtime):
        runtime.stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert report["frames_compared"] == 2 and report["candidate_models"] == [scoring_id]
    assert report["candidate_line_model_dir"] == str(unloadable)
    assert any(f"names {unloadable} (model {unloadable_id}), but its decisions came from {scoring_id}" in warning
               for warning in report["warnings"]), report["warnings"]  # fmt: skip


def test_a_model_change_on_either_side_is_warned_about() -> None:
    from workers.replay import _model_warnings

    assert _model_warnings(["live"], ["", "cand"], "shadow", "/m/cand") == []  # "": an error decision's model
    mixed = _model_warnings(["live", "live2"], ["cand", "cand2"], "shadow", "/m/cand2")
    assert len(mixed) == 2 and "line shadow scored with 2 models (cand, cand2)" in mixed[0]
    assert "the recording was decided by 2 models (live, live2;" in mixed[1]


def test_replay_refuses_the_recorded_line_and_says_when_a_recording_was_cut(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    path = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(3)])
    runtime = make_runtime("replay", "rp2")
    with pytest.raises(RecordingError, match="was recorded on line line-1"):
        replay(runtime, path, None, 0.0, "run2", 1.0)
    with pytest.raises(RecordingError, match="was recorded on line line-1"):
        replay(runtime, path, "line-1", 0.0, "run2", 1.0)
    cut = tmp_path / "cut.lir"
    cut.write_bytes(path.read_bytes()[:-200])  # the end record and part of the last decision
    report = replay(make_runtime("replay", "rp3"), cut, "nobody-scores-this", 0.0, "run3", 0.5)
    assert report["recording_truncated"] and not report["recording_complete"] and report["timed_out"]
    assert report["recording_frames"] == report["frames_replayed"] == 3
    warnings = report["warnings"]
    assert any("was cut: it ends without the end record" in w and "its 3 whole frames are intact and were used" in w
               for w in warnings)  # fmt: skip
    assert any("is a scoring worker and a sink running" in warning for warning in warnings)
    damaged = tmp_path / "damaged.lir"
    data = bytearray(path.read_bytes())
    data[data.index(b"f1") + 1] ^= 0x01  # frame 2's id, inside its payload
    damaged.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=r"entry 3 \(frame 2, stream entry 2-0\) is damaged"):
        replay(make_runtime("replay", "rp4"), damaged, "nobody-scores-this", 0.0, "run4", 0.5)


def test_replay_of_an_empty_or_old_recording_says_so(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    empty = write_recording(tmp_path / "empty.lir", [])
    report = replay(make_runtime("replay", "rp5"), empty, "shadow", 1.0, "run5", 5.0)
    assert report["recording_complete"] and report["frames_replayed"] == report["frames_compared"] == 0
    assert not report["timed_out"] and report["mean_abs_score_change"] is None
    assert report["warnings"] == [f"{empty} holds no frames: nothing was replayed or compared"]
    old = write_v1_recording(tmp_path / "old.lir", [("1-0", tiny_frame("f0")), ("-", decision_for("f0"))])
    report = replay(make_runtime("replay", "rp6"), old, "nobody-scores-this", 0.0, "run6", 0.5)
    assert report["recording_version"] == 1 and not report["recording_truncated"] and report["frames_replayed"] == 1
    assert any("version 1 recording: it has no checksums" in warning for warning in report["warnings"])
    assert not any("was cut" in warning for warning in report["warnings"])


def test_a_stopped_replay_reports_what_it_sent(make_runtime: Callable[..., WorkerRuntime], tmp_path: Path) -> None:
    """Ctrl-C during a replay at the recorded pace (frames 1 s apart): the report says it was stopped, not that the
    candidate line timed out."""
    frames = [tiny_frame(f"f{n}", captured_at_ns=10**9 * (n + 1)) for n in range(10)]
    path = write_recording(tmp_path / "rec.lir", frames, entry_ids=stream_ids(frames))
    runtime = make_runtime("replay", "rp7")
    threading.Timer(1.5, runtime.stop.set).start()
    report = replay(runtime, path, "nobody-scores-this", 1.0, "run7", 30.0)
    assert report["stopped"] and not report["timed_out"]
    assert 1 <= report["frames_replayed"] < 10
    assert any(f"stopped (Ctrl-C or SIGTERM) after sending {report['frames_replayed']} of 10 frames" in warning
               for warning in report["warnings"])  # fmt: skip


def test_a_replay_onto_a_line_that_takes_no_more_frames_gives_up(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """Nobody scores the line: once its backlog is full (ingest.live_queue_limit) the ingest waits for room that never
    comes; the replay gives up after --timeout-s without progress instead of waiting for ever."""
    runtime = make_runtime("replay", "rp8")
    limit = runtime.config.ingest.live_queue_limit
    path = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(limit + 10)])
    report = replay(runtime, path, "nobody-scores-this", 0.0, "run8", 1.0)
    assert report["timed_out"] and report["frames_replayed"] == limit
    assert any(f"took no frame and gave no decision for 1 s, {limit} of {limit + 10} frames sent" in warning
               for warning in report["warnings"])  # fmt: skip


def test_a_recorded_pause_longer_than_the_timeout_is_not_taken_for_a_stuck_line(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    frames = [tiny_frame("f0", captured_at_ns=10**9), tiny_frame("f1", captured_at_ns=4 * 10**9)]  # 3 s apart
    path = write_recording(tmp_path / "rec.lir", frames, entry_ids=stream_ids(frames))
    report = replay(make_runtime("replay", "rp9"), path, "nobody-scores-this", 1.0, "run9", 1.0)
    assert report["frames_replayed"] == 2
    assert not any("took no frame" in warning for warning in report["warnings"])


@pytest.fixture
def redis_watch() -> Iterator[socket.socket]:
    """A port to give as REDIS_URL that only listens: a client that connects is left in its accept queue."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


def _bad_recordings(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Recordings `lineinspect replay` must refuse, each with the problem its message names."""
    good = write_recording(tmp_path / "good.lir", [tiny_frame(f"f{n}") for n in range(3)])
    damaged = bytearray(good.read_bytes())
    damaged[damaged.index(b"f2") + 1] ^= 0x01  # frame 3's id, inside its payload
    (tmp_path / "damaged.lir").write_bytes(bytes(damaged))
    (tmp_path / "headless.lir").write_bytes(good.read_bytes()[:20])  # cut inside its header
    (tmp_path / "other.lir").write_bytes(b"PK\x03\x04 a zip file, say")
    (tmp_path / "newer.lir").write_bytes(msgpack.packb({"format": "lineinspect-recording", "version": 99}))
    return {
        "missing": (tmp_path / "missing.lir", "cannot be read (No such file or directory)"),
        "damaged": (tmp_path / "damaged.lir", "entry 5 (frame 3, stream entry 3-0) is damaged"),
        "cut in its header": (tmp_path / "headless.lir", "no whole header"),
        "wrong format": (tmp_path / "other.lir", "not a lineinspect-recording file"),
        "newer version": (tmp_path / "newer.lir", "version 99; this lineinspect reads versions 1 to 3"),
        "its own line": (good, "was recorded on line line-1"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "damaged", "cut in its header", "wrong format", "newer version", "its own line"]
)
def test_lineinspect_replay_refuses_a_bad_recording_before_starting_anything(
    case: str, redis_watch: socket.socket, tmp_path: Path
) -> None:
    # the worker runtime (health port, Redis client) started first, then the file was read: a refused file still
    # started a replay worker, and with Redis hanging it waited on it before saying the file was bad
    path, problem = _bad_recordings(tmp_path)[case]
    port = redis_watch.getsockname()[1]
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "PYTHONPATH": str(REPO_ROOT)}
    line = "line-1" if case == "its own line" else "shadow"
    result = subprocess.run([sys.executable, "-m", "workers.cli", "replay", str(path), "--line", line],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"lineinspect replay: error: {path}" in result.stderr and problem in result.stderr, result.stderr
    assert "worker started" not in result.stderr  # no runtime, no health port
    with pytest.raises(BlockingIOError):
        redis_watch.accept()  # nobody connected to Redis


def test_the_report_lists_where_the_recording_misses_frames(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # the recorder counted frames trimmed before it read them, but the file did not say where: a replay compared
    # fewer frames than the line saw without a word
    frames = [tiny_frame(f"f{n}") for n in range(3)]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        writer.frame("1-0", encode_frame(frames[0]))
        writer.gap(7, "1-0", "9-0")
        for number, frame in ((9, frames[1]), (10, frames[2])):
            writer.frame(f"{number}-0", encode_frame(frame))
        writer.gap(2, "10-0", "")
    report = replay(make_runtime("replay", "rp10"), tmp_path / "rec.lir", "nobody-scores-this", 0.0, "run10", 0.5)
    assert report["recording_frames"] == report["frames_replayed"] == 3 and report["recording_complete"]
    assert report["frames_missing_from_recording"] == 9
    assert report["recording_gaps"] == [
        {"after_frame": 1, "frames": 7, "after_entry_id": "1-0", "before_entry_id": "9-0"},
        {"after_frame": 3, "frames": 2, "after_entry_id": "10-0", "before_entry_id": None},
    ]
    assert any(f"{tmp_path / 'rec.lir'} misses 9 frames the line saw" in warning
               and "7 after frame 1 (stream entries 1-0 to 9-0); 2 after frame 3 (stream entries 10-0 to the end)"
               in warning for warning in report["warnings"]), report["warnings"]  # fmt: skip


def test_the_report_warns_of_frames_it_could_not_compare(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    # frames recorded without their decision (the recorder stopped waiting) and decisions for no recorded frame were
    # left out of the comparison with only a count (missing_in_baseline) or a log line
    frames = [tiny_frame(f"f{n}") for n in range(3)]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            writer.frame(f"{number}-0", encode_frame(frame))
        writer.decision("1-0", encode_decision(decision_for("f0")))
        writer.decision("7-0", encode_decision(decision_for("f7")))  # for no recorded frame
    report = replay(make_runtime("replay", "rp11"), tmp_path / "rec.lir", "nobody-scores-this", 0.0, "run11", 0.5)
    assert report["recording_frames_without_decision"] == 2 and report["recording_unmatched_decisions"] == 1
    warnings = report["warnings"]
    assert any("2 of 3 recorded frames have no recorded decision" in warning for warning in warnings), warnings
    assert any("holds 1 decision for no recorded frame" in warning for warning in warnings), warnings


def test_replay_help_says_line_is_the_shadow_line_and_gives_the_defaults() -> None:
    """`lineinspect replay --help` matched the other commands, not replay: it offered worker.line_id as --line's
    default, which replay refuses (it needs the shadow line), and named no default for --speed or --timeout-s."""
    from workers.cli import build_parser

    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    assert isinstance(subparsers.choices, dict)
    options = {action.dest: action.help or "" for action in subparsers.choices["replay"]._actions}
    assert "worker.line_id" not in options["line"] and "required" in options["line"]
    assert "candidate" in options["line"] and "never the recorded line" in options["line"]
    assert "default 0" in options["speed"] and "default 120" in options["timeout_s"]


@pytest.mark.parametrize("timeout_s", ["-5", "0", "nan"])
def test_replay_refuses_a_timeout_that_waits_for_no_decision(
    timeout_s: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout-s -5 (or 0) was taken: the replay sent every frame, stopped waiting at once and reported most of
    them undecided 'within -5 s of the last frame sent', as if the shadow line were broken."""
    from workers.cli import main

    recording = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(2)])
    assert main(["replay", str(recording), "--line", "shadow", "--timeout-s", timeout_s]) == 2
    assert f"lineinspect replay: error: --timeout-s must be more than 0 seconds, got {timeout_s}" in (
        capsys.readouterr().err
    )


def test_recorded_frames_the_replay_cannot_send_are_counted_and_the_others_still_sent(
    make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """Frames valid on the wire that the replay cannot send as they are: a 250-character camera id (valid; the frame
    id ingest makes from it, CAMERA_ID-<16 hex>, is not) and 255 metadata entries (valid; with replay_of,
    replay_frame and replay_run 258 are not). The replay's ingest raised a ValidationError at the first of them and
    sent nothing more, and the report blamed streams.max_frame_bytes."""
    frames = [tiny_frame("long-camera").model_copy(update={"camera_id": "c" * 250}),
              tiny_frame("full-metadata").model_copy(update={"metadata": {f"k{n}": n for n in range(255)}}),
              tiny_frame("fine")]  # fmt: skip
    path = write_recording(tmp_path / "rec.lir", frames)
    runtime = make_runtime("replay", "rp10")
    report = replay(runtime, path, "nobody-scores-this", 0.0, "run10", 0.5)
    assert report["frames_replayed"] == 1
    sent = runtime.client.read_range(LineKeys(runtime.config.streams.prefix, "nobody-scores-this").frames, "0-0", 10)
    assert [msgpack.unpackb(entry.payload or b"")["metadata"]["replay_of"] for entry in sent] == ["fine"]
    (not_sent,) = [warning for warning in report["warnings"] if "were not sent" in warning]
    assert not_sent.startswith("2 of 3 frames were not sent (2 that no frame may carry (a camera id too long")
    assert "max_frame_bytes" not in not_sent
    dropped = runtime.metrics.registry.get_sample_value(
        "lineinspect_dropped_frames_total", {"line": "nobody-scores-this", "camera": "c" * 250, "reason": "invalid"}
    )
    assert dropped == 1


@pytest.mark.parametrize(("line", "problem"), [("health:score", "is reserved: 'health' names the workers' heartbeat"),
                                               ("shadow\r", "holds control character U+000D")])  # fmt: skip
def test_replay_refuses_a_shadow_line_no_worker_may_run(
    line: str, problem: str, redis_url: str, stream_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """replay took --line as given, where every other command refuses a line id the wire or the heartbeats' keys
    cannot take: onto 'health:score' it published the recording to P:health:score:frames, among the heartbeats
    (P:health:<role>:<name>), and onto 'shadow\\r' it sent no frame (each refused by the wire) and reported that."""
    from workers.cli import main

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("LINEINSPECT__STREAMS__PREFIX", stream_prefix)
    recording = write_recording(tmp_path / "rec.lir", [tiny_frame(f"f{n}") for n in range(2)])
    assert main(["replay", str(recording), "--line", line, "--timeout-s", "0.5"]) == 2
    assert f"lineinspect replay: error: --line {line!r} {problem}" in capsys.readouterr().err
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{stream_prefix}:*")) == []  # nothing reached Redis
