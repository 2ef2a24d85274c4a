"""What a replay report gives an engineer deciding go-live: scores of two models on one scale (each over its own
threshold), and how each side decided the frames whose truth is known (their ``label``)."""

from __future__ import annotations

import pytest

from pipeline.messages import MetadataValue
from tests.workers.recordings import decision_for
from workers.record import DecisionSummary, summarise
from workers.replay import compare_decisions


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
