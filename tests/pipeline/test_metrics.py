"""Metrics records decisions into its own registry, in Prometheus naming."""

from __future__ import annotations

import socket
import time

from pipeline.config import Config
from pipeline.messages import Decision, StageTimings, Verdict
from pipeline.metrics import Metrics
from pipeline.streams import GroupStats, StreamClient


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
    metrics.observe_decision(decision("fail", score=4.0 * 21), published_at_ns=1_050_000_000)  # a clear defect
    assert value("lineinspect_score_threshold_ratio_bucket", {"line": "line-1", "le": "20.0"}) == 4
    assert value("lineinspect_score_threshold_ratio_bucket", {"line": "line-1", "le": "50.0"}) == 5


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


def test_redis_total_of_entries_trimmed_unread_becomes_a_counter() -> None:
    metrics = Metrics()
    labels = {"stream": "p:l:frames", "group": "scorers"}

    def observe(total: int | None) -> float | None:
        stats = GroupStats(pending=0, lag=0, last_delivered_id="1-0", trimmed_unread=total)
        metrics.observe_groups("p:l:frames", {"scorers": stats})
        return metrics.registry.get_sample_value("lineinspect_stream_trimmed_unread_total", labels)

    assert observe(None) is None  # Redis before 7 counts none: no series
    assert [observe(total) for total in (0, 7, 7, 14)] == [0, 7, 7, 14]
    assert [observe(total) for total in (2, 5)] == [14, 17]  # Redis lost its data: counted on from its new total
    restarted = Metrics()  # a restarted sink carries on from Redis's total
    restarted.observe_groups("p:l:frames", {"scorers": GroupStats(0, 0, "1-0", trimmed_unread=5)})
    assert restarted.registry.get_sample_value("lineinspect_stream_trimmed_unread_total", labels) == 5


def test_latency_buckets_resolve_a_steady_line_a_backlog_and_a_claimed_frame() -> None:
    metrics = Metrics()
    # a steady line (0.1-0.5 s), a 200-frame burst (p50 ~5 s), a claimed frame (30-45 s), a scorer restart
    for latency_s in (0.12, 0.18, 0.45, 4.2, 5.5, 40.0, 95.0):
        metrics.observe_decision(decision("pass"), published_at_ns=1_000_000_000 + int(latency_s * 1e9))
    value = metrics.registry.get_sample_value
    labels = {"line": "line-1"}

    def below(le: str) -> float | None:
        return value("lineinspect_end_to_end_latency_seconds_bucket", {**labels, "le": le})

    assert (below("0.1"), below("0.15"), below("0.2"), below("0.5")) == (0, 1, 2, 3)
    assert below("1.0") == 3  # the alert's 1 s budget is a bucket edge
    assert (below("5.0"), below("7.5"), below("30.0"), below("60.0"), below("120.0")) == (4, 5, 5, 6, 7)
    assert below("300.0") == below("+Inf") == 7


def test_every_worker_exports_its_process_start_time_memory_and_version() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    start_time = value("process_start_time_seconds")
    assert start_time is not None and start_time > 1.7e9  # a restart shows as a change of this value
    resident = value("process_resident_memory_bytes")
    assert resident is not None and resident > 1e6
    rendered = metrics.render().decode()
    assert 'lineinspect_build_info{version="' in rendered and "python_info{" in rendered


def test_redis_up_pings_at_each_scrape_and_a_failing_ping_reads_zero() -> None:
    answers: list[bool | Exception] = [True, False, ConnectionError("refused")]
    pings = 0

    def ping() -> bool:
        nonlocal pings
        pings += 1
        answer = answers[pings - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    metrics = Metrics()
    assert b"lineinspect_redis_up" not in metrics.render()  # only a worker that watches its Redis exports it
    metrics.watch_redis(ping)
    assert pings == 0  # registering does not ping
    assert [metrics.registry.get_sample_value("lineinspect_redis_up") for _ in answers] == [1, 0, 0]
    assert pings == 3


def test_redis_up_from_a_real_client_reads_1_for_a_live_redis_and_0_fast_for_a_closed_port(config: Config) -> None:
    live = StreamClient(config.redis.url or "", config.redis, config.streams)
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    gone = StreamClient(f"redis://127.0.0.1:{closed_port}/0", config.redis, config.streams)
    try:
        metrics, lost = Metrics(), Metrics()
        metrics.watch_redis(live.ping)
        lost.watch_redis(gone.ping)
        assert metrics.registry.get_sample_value("lineinspect_redis_up") == 1
        started = time.monotonic()
        assert lost.registry.get_sample_value("lineinspect_redis_up") == 0
        assert time.monotonic() - started < config.redis.connect_timeout_s  # a scrape is not held up by retries
    finally:
        live.close()
        gone.close()
