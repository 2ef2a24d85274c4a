"""Prometheus metrics: one ``Metrics`` object owns its ``CollectorRegistry`` (no metric globals).

Each worker process builds one and records what it sees; ``render()`` is what ``/metrics`` serves. Latency buckets
run from 5 ms to 10 s, suited to tens of milliseconds up to seconds. Scores are recorded relative to the line's
threshold (1 = the pass/fail boundary), so their distribution is comparable across models and shows drift (light,
camera, material) before the fail rate moves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.messages import Decision
from pipeline.streams import GroupStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
STAGES = ("queue_wait", "decode", "backbone", "search", "postprocess", "publish")


class Metrics:
    """Every lineinspect metric, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.end_to_end_latency = Histogram(
            "lineinspect_end_to_end_latency_seconds",
            "Capture to published decision.",
            ["line"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.stage_latency = Histogram(
            "lineinspect_stage_latency_seconds",
            "Time per pipeline stage, per frame.",
            ["line", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        self.score_ratio = Histogram(
            "lineinspect_score_threshold_ratio",
            "Image score divided by the line's threshold (above 1 fails); watch its quantiles for drift.",
            ["line"],
            buckets=SCORE_RATIO_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "lineinspect_batch_size", "Frames per scored batch.", ["line"], buckets=BATCH_SIZE_BUCKETS, registry=reg
        )
        self.shifted_frames = Counter(
            "lineinspect_shifted_frames_total",
            "Frames scored again at N-pad's shifted views (those failing unshifted; all if shift_only_failing is off).",
            ["line"],
            registry=reg,
        )
        self.unregistered_frames = Counter(
            "lineinspect_unregistered_frames_total",
            "Frames a registering model could not move into its good frames' pose (too unlike them or too far off), "
            "scored as they came. A rising rate: the camera or fixture moved, the light changed, or another part.",
            ["line"],
            registry=reg,
        )
        self.frames = Counter(
            "lineinspect_frames_total", "Published decisions by verdict.", ["line", "verdict"], registry=reg
        )
        self.errors = Counter(
            "lineinspect_errors_total", "Error decisions by reason.", ["line", "reason"], registry=reg
        )
        self.dead_letters = Counter(
            "lineinspect_dead_letters_total",
            "Entries moved to the dead-letter stream.",
            ["line", "reason"],
            registry=reg,
        )
        self.ingested_frames = Counter(
            "lineinspect_ingested_frames_total",
            "Frames ingest published onto the line's frames stream, per camera.",
            ["line", "camera"],
            registry=reg,
        )
        self.dropped_frames = Counter(
            "lineinspect_dropped_frames_total",
            "Live frames dropped under backpressure.",
            ["line", "camera"],
            registry=reg,
        )
        self.duplicates = Counter(
            "lineinspect_duplicate_decisions_total",
            "Redelivered decisions not published again.",
            ["line"],
            registry=reg,
        )
        self.heatmaps = Counter("lineinspect_heatmaps_written_total", "Heatmap PNGs written.", ["line"], registry=reg)
        self.heatmap_failures = Counter(
            "lineinspect_heatmap_failures_total",
            "Decisions published without their heatmap because it could not be drawn or written.",
            ["line"],
            registry=reg,
        )
        self.stream_lag = Gauge(
            "lineinspect_stream_lag", "Entries not yet delivered to the group.", ["stream", "group"], registry=reg
        )
        self.stream_pending = Gauge(
            "lineinspect_stream_pending", "Entries delivered but not acknowledged.", ["stream", "group"], registry=reg
        )
        self.model_info = Gauge(
            "lineinspect_model_info", "1 for the model version in use on a line.", ["line", "model_id"], registry=reg
        )
        self.model_reloads = Counter(
            "lineinspect_model_reloads_total", "Model hot reloads by outcome.", ["line", "outcome"], registry=reg
        )
        self.worker_up = Gauge("lineinspect_worker_up", "1 while the worker runs.", ["role", "name"], registry=reg)

    def observe_decision(self, decision: Decision, published_at_ns: int) -> None:
        """Record one published decision: verdict, error reason, per-stage and end-to-end latency."""
        line = decision.line_id
        self.frames.labels(line, decision.verdict).inc()
        if decision.verdict == "error":
            self.errors.labels(line, decision.error_reason or "unknown").inc()
        for stage in STAGES:
            seconds = getattr(decision.timings, f"{stage}_s")
            if seconds > 0:
                self.stage_latency.labels(line, stage).observe(seconds)
        if decision.score is not None and decision.threshold is not None and decision.threshold > 0:
            self.score_ratio.labels(line).observe(decision.score / decision.threshold)
        latency_s = (published_at_ns - decision.captured_at_ns) / 1e9
        if latency_s >= 0:
            self.end_to_end_latency.labels(line).observe(latency_s)

    def set_model(self, line: str, model_id: str) -> None:
        """Mark ``model_id`` as the line's model, clearing the previous one."""
        for labels in list(self.model_info._metrics):  # prometheus_client lists labels only privately
            if labels[0] == line:
                self.model_info.remove(*labels)
        self.model_info.labels(line, model_id).set(1)

    def observe_groups(self, stream: str, stats: dict[str, GroupStats]) -> None:
        for group, group_stats in stats.items():
            self.stream_pending.labels(stream, group).set(group_stats.pending)
            if group_stats.lag is not None:
                self.stream_lag.labels(stream, group).set(group_stats.lag)

    def render(self) -> bytes:
        return generate_latest(self.registry)
