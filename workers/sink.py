"""Sink worker: results stream -> heatmap PNGs + the line's decisions stream (once per frame_id) + Prometheus.

Each result is published with ``publish_decision_once`` (a ``published:<frame_id>`` marker set atomically with the
XADD), so a redelivered or twice-scored frame never yields two published decisions. Failed frames (all frames with
``sink.save_all_heatmaps``) get a heatmap overlay drawn on the original frame, fetched from the frames stream.
Stream lag and pending counts of both consumer groups are exported every second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from pipeline.codec import CodecError, decode_decision, decode_frame, decode_pixels, encode_decision
from pipeline.messages import Decision, StageTimings, now_ns
from pipeline.streams import SINK_GROUP, Commit, DeadLetter, LineKeys, StreamEntry
from workers.heatmaps import HeatmapStore
from workers.lifecycle import WorkerRuntime

logger = logging.getLogger(__name__)
READ_COUNT = 64


class SinkWorker:
    """Consumes one line's results stream in the ``sinks`` group."""

    def __init__(self, runtime: WorkerRuntime, line_id: str) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.keys = LineKeys(self.config.streams.prefix, line_id)
        sink = self.config.sink
        self.heatmaps = HeatmapStore(sink.heatmap_dir, sink.heatmap_max_files, sink.heatmap_max_age_s)
        self._next_stats = 0.0
        self._next_claim = 0.0

    def _overlay_image(self, decision: Decision, anomaly_map: np.ndarray) -> np.ndarray:
        """The original frame's pixels, or a grey canvas when the frame has been trimmed from Redis."""
        payload = None
        if decision.frame_entry_id:
            payload = self.runtime.client.fetch(self.keys.frames, decision.frame_entry_id)
        if payload is not None:
            try:
                return decode_pixels(decode_frame(payload))
            except CodecError as error:
                logger.warning(
                    "frame for heatmap unreadable", extra={"frame_id": decision.frame_id, "error": str(error)}
                )
        side = anomaly_map.shape[0]
        return np.full((side, side, 3), 128, dtype=np.uint8)

    def _heatmap(self, decision: Decision) -> str | None:
        anomaly_map = decision.anomaly_map_array()
        if anomaly_map is None:
            return None
        image = self._overlay_image(decision, anomaly_map)
        path = self.heatmaps.write(decision.line_id, decision.frame_id, image, anomaly_map, decision.threshold)
        self.runtime.metrics.heatmaps.labels(decision.line_id).inc()
        return str(path)

    def handle(self, entries: Sequence[StreamEntry]) -> int:
        """Publish each result once, then acknowledge them all; returns how many were newly published."""
        published = 0
        letters: list[DeadLetter] = []
        for entry in entries:
            if entry.payload is None:
                letters.append(
                    DeadLetter(entry.entry_id, None, "entry_trimmed", "result trimmed before the sink read it")
                )
                continue
            try:
                decision = decode_decision(entry.payload)
            except CodecError as error:
                letters.append(DeadLetter(entry.entry_id, entry.payload, error.reason.value, error.detail))
                continue
            published += self._publish(decision)
        # results carry anomaly maps and are read by nobody else: delete them once acknowledged to bound memory
        commit = Commit(dead_letters=letters, acks=[entry.entry_id for entry in entries], delete_acked=True)
        self.runtime.client.commit(self.keys.results, SINK_GROUP, commit, self.keys.deadletter)
        return published

    def _publish(self, decision: Decision) -> int:
        try:
            heatmap_ref = self._heatmap(decision)
        except (OSError, ValueError) as error:
            logger.error("heatmap not written", extra={"frame_id": decision.frame_id, "error": str(error)})
            heatmap_ref = None
        published_at = now_ns()
        publish_s = max(0.0, (published_at - decision.decided_at_ns) / 1e9) if decision.decided_at_ns else 0.0
        timings = StageTimings(**{**decision.timings.model_dump(), "publish_s": publish_s})
        final = decision.model_copy(
            update={
                "heatmap_ref": heatmap_ref,
                "published_at_ns": published_at,
                "timings": timings,
                "anomaly_map": None,
                "map_size": None,
            }
        )
        appended = self.runtime.client.publish_decision_once(
            self.keys, decision.frame_id, encode_decision(final), self.config.streams.published_ttl_s
        )
        if not appended:
            self.runtime.metrics.duplicates.labels(decision.line_id).inc()
            logger.info("duplicate decision not published again", extra={"frame_id": decision.frame_id})
            return 0
        self.runtime.metrics.observe_decision(final, published_at)
        if decision.model_id:
            self.runtime.metrics.set_model(decision.line_id, decision.model_id)
        return 1

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.heatmaps.maybe_prune(now)
        if now >= self._next_stats:
            self._next_stats = now + 1.0
            for stream in (self.keys.frames, self.keys.results):
                self.runtime.metrics.observe_groups(stream, self.runtime.client.group_stats(stream))

    def run(self) -> None:
        client, name, stop = self.runtime.client, self.runtime.name, self.runtime.stop
        streams = self.config.streams
        client.ensure_group(self.keys.results, SINK_GROUP)
        while not stop.is_set():
            own = client.read_own_pending(self.keys.results, SINK_GROUP, name, READ_COUNT)
            if not own:
                break
            self.handle(own)
        while not stop.is_set():
            self.runtime.heartbeat.beat("ok", line=self.keys.line_id)
            if time.monotonic() >= self._next_claim:
                self._next_claim = time.monotonic() + streams.claim_idle_ms / 2000.0
                self.handle(client.claim_stale(self.keys.results, SINK_GROUP, name, streams.claim_idle_ms, READ_COUNT))
            self.handle(client.read_new(self.keys.results, SINK_GROUP, name, READ_COUNT, streams.block_ms))
            self._housekeeping()
        self.runtime.heartbeat.beat("draining", force=True)
