"""Prometheus metrics: one ``Metrics`` object owns its ``CollectorRegistry`` (no metric globals).

Each worker process builds one and records what it sees; ``render()`` is what ``/metrics`` serves, together with
the process's own ``process_*`` metrics (start time: restarts; resident memory; CPU) and ``python_info``.

Latency buckets run from 5 ms to 5 min. A steady line decides in 0.1-0.5 s (0.1 to 0.5 in five steps; the 1 s alert
budget is a bucket edge); a backlog is worked off in seconds (README's ``run --frames 200`` queues 200 frames at once:
p50 about 5 s, and 48 s with p99 67 s measured on a 2-core host at load 10), a frame a dead worker held is claimed
after 30-45 s, and frames wait out a scorer's restart and model load: buckets up to 300 s keep those quantiles real
instead of pinned at the last edge (it was 10 s). Stages (decode, publish: milliseconds) share them.

Scores are recorded relative to the line's threshold (1 = the pass/fail boundary), so their distribution is
comparable across models and shows drift (light, camera, material) before the fail rate moves. Its buckets are fine
around 1 and reach 50: defective parts score far above the threshold (the demo's averaged 21x), and with the old
last edge at 5 the p90 and p99 of a line with many rejects read 5 whatever they were.

Labels are bounded: line, camera, stage, verdict, reason (a fixed vocabulary), model id (one per line at a time),
stream and group (a few per line), role and worker name; never a frame id or a file path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.messages import Decision
from pipeline.streams import GroupStats

LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
STAGES = ("queue_wait", "decode", "backbone", "search", "postprocess", "publish")


class Metrics:
    """Every lineinspect metric, registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.build_info = Gauge(
            "lineinspect_build_info", "1, labelled with the lineinspect version this process runs.", ["version"],
            registry=reg,
        )  # fmt: skip
        self.build_info.labels(_lineinspect_version()).set(1)
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
            "Frames ingest did not send, by reason: backpressure (a live camera's oldest frames, while the scorers' "
            "backlog is at ingest.live_queue_limit), too_large (over streams.max_frame_bytes) or invalid (no valid "
            "Frame: ids or metadata over the wire's limits, e.g. a replayed frame with the replay's own keys).",
            ["line", "camera", "reason"],
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
        self.stream_trimmed_unread = Counter(
            "lineinspect_stream_trimmed_unread",
            "Entries trimmed from the stream (MAXLEN) before the group read them: on the frames stream, frames no "
            "scorer saw (no decision, no dead letter). The line's total as Redis keeps it (Redis 7+, from the group's "
            "first read on), counted once the group catches up or its lag exceeds the stream's length; every sink of "
            "the line reports the same.",
            ["stream", "group"],
            registry=reg,
        )
        self._trimmed_unread_seen: dict[tuple[str, str], int] = {}  # (stream, group) -> Redis's total last observed
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
        """Lag and pending of each group, and what Redis's total of entries trimmed before the group read them grew
        by since this process last looked (all of it the first time: Prometheus sees a sink that restarted carry on
        from its last value; a total that fell, Redis having lost its data, counts on from its new value)."""
        for group, group_stats in stats.items():
            self.stream_pending.labels(stream, group).set(group_stats.pending)
            if group_stats.lag is not None:
                self.stream_lag.labels(stream, group).set(group_stats.lag)
            total = group_stats.trimmed_unread
            if total is not None:
                seen = self._trimmed_unread_seen.get((stream, group), 0)
                self.stream_trimmed_unread.labels(stream, group).inc(max(0, total - seen))
                self._trimmed_unread_seen[stream, group] = total

    def watch_redis(self, ping: Callable[[], bool]) -> None:
        """Export ``lineinspect_redis_up``: 1 if ``ping()`` answers true when ``/metrics`` is scraped, else 0.

        ``ping`` is the worker's own ``StreamClient.ping`` (it waits at most its socket timeout,
        ``redis.connect_timeout_s`` + ``streams.block_ms``: 5.2 s by default, under Prometheus' 10 s scrape timeout,
        when Redis hangs); an exception counts as unreachable, so a scrape never fails on Redis.
        """
        self.registry.register(_RedisUpCollector(ping))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RedisUpCollector(Collector):
    def __init__(self, ping: Callable[[], bool]) -> None:
        self.ping = ping

    def describe(self) -> list[Metric]:  # registering must not ping: Redis may be away at start-up
        return [GaugeMetricFamily("lineinspect_redis_up", "")]

    def collect(self) -> Iterator[Metric]:
        try:
            up = 1.0 if self.ping() else 0.0
        except Exception:  # any failure to ping is "unreachable"; a scrape must still answer
            up = 0.0
        yield GaugeMetricFamily("lineinspect_redis_up", "1 if this worker's Redis answered PING at scrape time.", up)


def _lineinspect_version() -> str:
    try:
        return metadata.version("lineinspect")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
