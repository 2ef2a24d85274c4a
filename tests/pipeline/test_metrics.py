"""Metrics records decisions into its own registry, in Prometheus naming."""

from __future__ import annotations

from pipeline.messages import Decision, StageTimings, Verdict
from pipeline.metrics import Metrics
from pipeline.streams import GroupStats


def decision(verdict: Verdict, reason: str | None = None, score: float | None = None) -> Decision:
    return Decision(
        score=score,
        threshold=None if score is None else 4.0,
        frame_id="f",
        line_id="line-1",
        camera_id="cam0",
        verdict=verdict,
        error_reason=reason,
        timings=StageTimings(decode_s=0.004, backbone_s=0.12),
        captured_at_ns=1_000_000_000,
    )


def test_decisions_feed_verdict_error_stage_and_latency_metrics() -> None:
    metrics = Metrics()
    metrics.observe_decision(decision("pass"), published_at_ns=1_050_000_000)
    metrics.observe_decision(decision("fail"), published_at_ns=1_300_000_000)
    metrics.observe_decision(decision("error", "stale"), published_at_ns=1_300_000_000)
    value = metrics.registry.get_sample_value
    assert value("lineinspect_frames_total", {"line": "line-1", "verdict": "pass"}) == 1
    assert value("lineinspect_frames_total", {"line": "line-1", "verdict": "fail"}) == 1
    assert value("lineinspect_errors_total", {"line": "line-1", "reason": "stale"}) == 1
    assert value("lineinspect_end_to_end_latency_seconds_count", {"line": "line-1"}) == 3
    assert value("lineinspect_end_to_end_latency_seconds_bucket", {"line": "line-1", "le": "0.05"}) == 1
    assert value("lineinspect_stage_latency_seconds_count", {"line": "line-1", "stage": "backbone"}) == 3
    assert value("lineinspect_stage_latency_seconds_count", {"line": "line-1", "stage": "search"}) is None


def test_scores_are_recorded_relative_to_the_threshold() -> None:
    metrics = Metrics()
    scored: list[tuple[Verdict, float]] = [("pass", 1.0), ("pass", 3.0), ("fail", 6.0), ("pass", -0.5)]
    for verdict, score in scored:
        metrics.observe_decision(decision(verdict, score=score), published_at_ns=1_050_000_000)
    metrics.observe_decision(decision("error", "stale"), published_at_ns=1_050_000_000)  # no score: not recorded
    value = metrics.registry.get_sample_value
    assert value("lineinspect_score_threshold_ratio_count", {"line": "line-1"}) == 4
    assert value("lineinspect_score_threshold_ratio_bucket", {"line": "line-1", "le": "0.25"}) == 2  # 0.25, -0.125
    assert value("lineinspect_score_threshold_ratio_bucket", {"line": "line-1", "le": "1.0"}) == 3  # + 0.75
    assert value("lineinspect_score_threshold_ratio_sum", {"line": "line-1"}) == 0.25 + 0.75 + 1.5 - 0.125


def test_model_info_keeps_one_version_per_line() -> None:
    metrics = Metrics()
    metrics.set_model("line-1", "aaa")
    metrics.set_model("line-2", "ccc")
    metrics.set_model("line-1", "bbb")
    value = metrics.registry.get_sample_value
    assert value("lineinspect_model_info", {"line": "line-1", "model_id": "aaa"}) is None
    assert value("lineinspect_model_info", {"line": "line-1", "model_id": "bbb"}) == 1
    assert value("lineinspect_model_info", {"line": "line-2", "model_id": "ccc"}) == 1


def test_group_stats_become_lag_and_pending_gauges_and_registries_are_separate() -> None:
    metrics, other = Metrics(), Metrics()
    metrics.observe_groups("p:l:frames", {"scorers": GroupStats(pending=3, lag=7, last_delivered_id="1-0")})
    labels = {"stream": "p:l:frames", "group": "scorers"}
    assert metrics.registry.get_sample_value("lineinspect_stream_pending", labels) == 3
    assert metrics.registry.get_sample_value("lineinspect_stream_lag", labels) == 7
    assert other.registry.get_sample_value("lineinspect_stream_lag", labels) is None
    assert b"lineinspect_stream_lag" in metrics.render()
