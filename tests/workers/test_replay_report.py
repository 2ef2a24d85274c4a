"""What a replay report gives an engineer deciding go-live: scores of two models on one scale (each over its own
threshold), how each side decided the frames whose truth is known (their ``label``), and how each side's threshold was
set, with a warning where that makes the comparison misleading (few good images, another false-reject rate)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import encode_decision, encode_frame
from pipeline.messages import MetadataValue
from pipeline.streams import LineKeys
from tests.workers.conftest import TinyLine
from tests.workers.helpers import start_thread
from tests.workers.processes import REPO_ROOT
from tests.workers.recordings import decision_for, tiny_frame
from workers.lifecycle import WorkerRuntime
from workers.record import DecisionSummary, RecordingWriter, ReplaySource, summarise
from workers.replay import compare_decisions, replay_and_compare
from workers.replay_thresholds import threshold_basis, threshold_warnings
from workers.score import ModelSlot, ScoreWorker, load_model
from workers.sink import SinkWorker
from workers.sources import FolderSource


def test_scores_of_two_models_are_compared_over_their_own_thresholds() -> None:
    """The candidate's scores run 10x the live model's and so does its threshold: raw scores cannot be compared, their
    ratios to each model's threshold can (the same frames sit at the same place against each threshold)."""
    live = [(1.5, "pass"), (2.7, "pass"), (3.3, "fail"), (6.0, "fail")]
    baseline = {n: summarise(decision_for(f"f{n}", verdict, score, threshold=3.0))
                for n, (score, verdict) in enumerate(live, start=1)}  # fmt: skip
    candidate = {n: summarise(decision_for(f"f{n}", verdict, 10 * score, threshold=30.0, model_id="cand"))
                 for n, (score, verdict) in enumerate(live, start=1)}  # fmt: skip
    candidate[3] = summarise(decision_for("f3", "pass", 27.0, threshold=30.0, model_id="cand"))
    report = compare_decisions(baseline, candidate)
    assert report["baseline_scores"]["p50"] != pytest.approx(report["candidate_scores"]["p50"])  # raw: 10x apart
    baseline_ratios, candidate_ratios = report["baseline_score_ratios"], report["candidate_score_ratios"]
    assert baseline_ratios["count"] == candidate_ratios["count"] == 4
    assert baseline_ratios["min"] == pytest.approx(0.5) and candidate_ratios["min"] == pytest.approx(0.5)
    assert baseline_ratios["max"] == pytest.approx(2.0) and candidate_ratios["max"] == pytest.approx(2.0)
    (changed,) = report["changed_frames"]
    assert changed["frame"] == 3
    assert (changed["baseline_score_ratio"], changed["candidate_score_ratio"]) == pytest.approx((1.1, 0.9))


def test_a_decision_without_score_or_positive_threshold_has_no_ratio() -> None:
    baseline = {1: summarise(decision_for("a", "pass", 1.0, threshold=0.0)), 2: summarise(decision_for("b", "fail"))}
    candidate = {1: summarise(decision_for("a", "error", None, threshold=2.0)),
                 2: summarise(decision_for("b", "pass", 1.0, threshold=2.0))}  # fmt: skip
    report = compare_decisions(baseline, candidate)
    assert report["baseline_score_ratios"] == {"count": 0}
    assert report["candidate_score_ratios"]["count"] == 1
    assert [(c["baseline_score_ratio"], c["candidate_score_ratio"]) for c in report["changed_frames"]] == [
        (None, None),
        (None, 0.5),
    ]


def test_the_accuracy_section_counts_false_rejects_and_catches_on_each_side() -> None:
    """Label "good" is a good part, any other label a defect type; unlabelled frames and errors count in neither."""

    def decided(verdict: str, label: str | None, model_id: str = "live") -> DecisionSummary:
        metadata: dict[str, MetadataValue] = {} if label is None else {"label": label}
        return summarise(decision_for("f", verdict, None if verdict == "error" else 1.0, model_id=model_id,
                                      metadata=metadata, threshold=2.0))  # fmt: skip

    frames = [("good", "pass", "fail"), ("good", "pass", "pass"), ("good", "fail", "pass"), ("good", "pass", "error"),
              ("crack", "fail", "fail"), ("crack", "pass", "fail"), ("stain", "pass", "pass"),
              (None, "fail", "pass")]  # fmt: skip
    baseline = {n: decided(before, label) for n, (label, before, _) in enumerate(frames, start=1)}
    candidate = {n: decided(after, label, "cand") for n, (label, _, after) in enumerate(frames, start=1)}
    candidate.pop(2)  # not decided by the candidate: not compared, on either side
    accuracy = compare_decisions(baseline, candidate)["accuracy"]
    assert accuracy["baseline"] == {"good_frames": 3, "good_rejected": 1, "good_errors": 0,
                                    "false_reject_rate": pytest.approx(1 / 3), "defective_frames": 3,
                                    "defective_caught": 1, "defective_errors": 0,
                                    "catch_rate": pytest.approx(1 / 3)}  # fmt: skip
    assert accuracy["candidate"] == {"good_frames": 3, "good_rejected": 1, "good_errors": 1,
                                     "false_reject_rate": pytest.approx(1 / 2), "defective_frames": 3,
                                     "defective_caught": 2, "defective_errors": 0,
                                     "catch_rate": pytest.approx(2 / 3)}  # fmt: skip


def test_without_labels_the_accuracy_section_has_no_rates() -> None:
    decisions = {1: summarise(decision_for("a", "pass")), 2: summarise(decision_for("b", "fail"))}
    side = compare_decisions(decisions, decisions)["accuracy"]["candidate"]
    assert (side["good_frames"], side["defective_frames"]) == (0, 0)
    assert side["false_reject_rate"] is None and side["catch_rate"] is None


def basis(images: int, rate: float | None = 0.005, method: str = "false_reject_rate", value: float | None = 3.0,
          model_id: str = "cand") -> dict[str, Any]:  # fmt: skip
    """A side's threshold as threshold_basis reads it from a model's manifest."""
    return {"model_dir": f"/models/{model_id}", "model_id": model_id, "threshold": value, "method": method,
            "false_reject_rate": rate, "good_images": images}  # fmt: skip


def test_thresholds_set_the_same_way_from_enough_good_images_need_no_warning() -> None:
    live = basis(400, model_id="live")
    assert threshold_warnings(live, basis(250), ["live"], {}, "line-1", "/models/live") == []


def test_a_threshold_from_few_good_images_is_warned_about_naming_the_count_on_either_side() -> None:
    live, weak = basis(9, model_id="live"), basis(3)
    candidate_warning, live_warning = threshold_warnings(live, weak, ["live"], {}, "line-1", "/models/live")
    assert "the candidate's threshold (model cand, /models/cand): 3 good images cannot resolve" in candidate_warning
    assert "the live model's threshold (model live, /models/live): 9 good images cannot resolve" in live_warning
    assert "--model /models/cand" in candidate_warning and "at least 20, better 200, good images" in candidate_warning


def test_a_threshold_from_too_few_images_to_resolve_its_rate_is_warned_about() -> None:
    (warning,) = threshold_warnings(basis(400, model_id="live"), basis(60), ["live"], {}, "line-1", None)
    assert "(model cand, /models/cand): 60 good images cannot resolve a false-reject rate of 0.50% (200 can)" in warning
    assert threshold_warnings(basis(400, model_id="live"), basis(60, rate=0.02), ["live"], {}, "line-1", None) == [
        "the candidate's threshold was set for a false-reject rate of 2.00%, the live model's for a false-reject rate "
        "of 0.50%: verdict changes come from that choice as much as from the models; calibrate the candidate as the "
        "live model was (`lineinspect calibrate --model /models/cand --good GOOD_IMAGES --false-reject-rate RATE`) "
        "before comparing verdicts"
    ]


def test_thresholds_set_another_way_are_warned_about() -> None:
    by_hand = basis(0, rate=None, method="manual", value=4.5)
    (warning,) = threshold_warnings(basis(400, model_id="live"), by_hand, ["live"], {}, "line-1", None)
    assert warning.startswith("the candidate's threshold was set by hand (at 4.5), the live model's for a "
                              "false-reject rate of 0.50%")  # fmt: skip
    assert threshold_warnings(basis(0, None, "manual", model_id="live"), by_hand, ["live"], {}, "line-1", None) == []


def test_a_candidate_without_threshold_is_named_and_its_uncalibrated_errors_explained() -> None:
    (warning,) = threshold_warnings(basis(400, model_id="live"), basis(0, value=None), ["live"], {"uncalibrated": 8},
                                    "line-1", None)  # fmt: skip
    assert warning.startswith("the candidate (model cand, /models/cand) has no threshold")
    (unknown_model,) = threshold_warnings(None, None, ["live"], {"uncalibrated": 8}, "line-1", None)
    assert unknown_model.startswith("8 candidate decisions are errors (uncalibrated)")


def test_a_live_model_whose_threshold_cannot_be_found_is_said_so() -> None:
    (warning,) = threshold_warnings(None, basis(400), ["live"], {}, "line-1", "/models/newer")
    assert "line line-1's model key names /models/newer, which is not that model" in warning
    assert "decided by model live" in warning and "were not compared" in warning
    assert threshold_warnings(None, basis(400), ["live", "live2"], {}, "line-1", None) == []  # mixed: said elsewhere


def test_threshold_basis_reads_the_manifest_of_the_model_that_decided(tiny_line: TinyLine, tmp_path: Path) -> None:
    from models.artifact import read_manifest, update_threshold
    from models.scorer import Threshold

    model_dir = tmp_path / "calibrated"
    shutil.copytree(tiny_line.model_dir, model_dir)
    model_id = update_threshold(model_dir, Threshold(2.5, "false_reject_rate", 0.01, 120))
    assert threshold_basis(str(model_dir), [model_id, ""]) == {
        "model_dir": str(model_dir), "model_id": model_id, "threshold": 2.5, "method": "false_reject_rate",
        "false_reject_rate": 0.01, "good_images": 120}  # fmt: skip
    assert threshold_basis(str(model_dir), ["another"]) is None  # the key names a model that decided nothing
    assert threshold_basis(str(model_dir), [model_id, "another"]) is None  # several models decided
    assert threshold_basis(str(tmp_path / "missing"), [model_id]) is None
    assert read_manifest(tiny_line.model_dir)["threshold"]["good_images"] == 2  # the tiny fits' own thresholds


def test_a_replay_of_demo_frames_reports_accuracy_and_warns_of_the_candidates_threshold(
    tiny_line: TinyLine, make_runtime: Callable[..., WorkerRuntime], tmp_path: Path
) -> None:
    """The walkthrough: frames of the demo line's test folders (which label them) recorded with the live model's
    decisions, replayed onto a shadow line running a candidate calibrated from 3 good images at 5% (the live one: 300
    at 0.5%). The report counts each side's false rejects and catches and warns of the candidate's threshold twice."""
    from models.artifact import update_threshold
    from models.scorer import Threshold

    live_dir, candidate_dir = tmp_path / "live", tmp_path / "candidate"
    shutil.copytree(tiny_line.model_dir, live_dir)
    shutil.copytree(tiny_line.other_model_dir, candidate_dir)
    live_id = update_threshold(live_dir, Threshold(3.0, "false_reject_rate", 0.005, 300))
    candidate_id = update_threshold(candidate_dir, Threshold(3.0, "false_reject_rate", 0.05, 3))
    folders = [tiny_line.good_images[0].parent, tiny_line.defect_images[0].parent]  # test/good, test/defect
    captures = [capture for folder in folders for capture in FolderSource("cam0", folder, loop=False).captures()]
    with RecordingWriter(tmp_path / "rec.lir", "line-1") as writer:
        for number, capture in enumerate(captures, start=1):
            frame = tiny_frame(f"f{number}").model_copy(update={"data": capture.data, "metadata": capture.metadata})
            writer.frame(f"{number}-0", encode_frame(frame))
            writer.decision(f"{number}-0", encode_decision(decision_for(frame.frame_id, "pass", 1.0, model_id=live_id,
                            threshold=3.0, metadata=capture.metadata)))  # fmt: skip
    replay_runtime = make_runtime("replay", "rp")
    replay_runtime.client.set_model_dir(LineKeys(replay_runtime.config.streams.prefix, "line-1"), str(live_dir))
    scorer_runtime, sink_runtime = make_runtime("score", "w1"), make_runtime("sink", "s1")
    slot = ModelSlot(scorer_runtime, LineKeys(scorer_runtime.config.streams.prefix, "shadow"), load_model("cpu"),
                     candidate_dir)  # fmt: skip
    threads = [start_thread(ScoreWorker(scorer_runtime, "shadow", slot).run),
               start_thread(SinkWorker(sink_runtime, "shadow").run)]  # fmt: skip
    report = replay_and_compare(replay_runtime, ReplaySource("replay", tmp_path / "rec.lir", 0.0, run_id="r1"),
                                "shadow", 120.0)  # fmt: skip
    for runtime in (scorer_runtime, sink_runtime):
        runtime.stop.set()
    for thread in threads:
        thread.join(timeout=30)

    good, defective = len(tiny_line.good_images), len(tiny_line.defect_images)
    assert report["frames_compared"] == good + defective and report["candidate_models"] == [candidate_id]
    assert report["transitions_by_label"].keys() == {"good", "defect"}
    live_side, candidate_side = report["accuracy"]["baseline"], report["accuracy"]["candidate"]
    assert (live_side["good_frames"], live_side["good_rejected"], live_side["defective_caught"]) == (good, 0, 0)
    assert (candidate_side["good_frames"], candidate_side["defective_frames"]) == (good, defective)
    fails = sum(transitions.get("pass->fail", 0) for transitions in report["transitions_by_label"].values())
    assert candidate_side["good_rejected"] + candidate_side["defective_caught"] == fails
    assert report["baseline_threshold_basis"]["good_images"] == 300
    assert report["candidate_threshold_basis"] == {"model_dir": str(candidate_dir), "model_id": candidate_id,
                                                   "threshold": 3.0, "method": "false_reject_rate",
                                                   "false_reject_rate": 0.05, "good_images": 3}  # fmt: skip
    weak, rates = report["warnings"]
    assert f"the candidate's threshold (model {candidate_id}, {candidate_dir}): 3 good images cannot resolve" in weak
    assert rates.startswith("the candidate's threshold was set for a false-reject rate of 5.00%, the live model's "
                            "for a false-reject rate of 0.50%")  # fmt: skip


def test_reading_how_the_thresholds_were_set_imports_no_torch(tiny_line: TinyLine) -> None:
    """A replay reads both sides' manifests and judges their thresholds: that imported torch and faiss (through
    models.artifact and models.threshold), seconds of a replay's start (4.5 s measured on this host, 1.5 s warm)
    for a JSON file and a constant."""
    from models.artifact import read_manifest

    model_dir, model_id = str(tiny_line.model_dir), str(read_manifest(tiny_line.model_dir)["model_id"])
    code = ("import sys\n"
            "import workers.replay\n"
            "from workers.replay_thresholds import threshold_basis, threshold_warnings\n"
            f"basis = threshold_basis({model_dir!r}, [{model_id!r}])\n"
            "assert basis is not None and basis['good_images'] == 2, basis\n"
            "assert threshold_warnings(basis, basis, [basis['model_id']], {}, 'line-1', None)  # 2 images: weak\n"
            "print(sorted(name for name in ('torch', 'faiss', 'timm') if name in sys.modules))\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
