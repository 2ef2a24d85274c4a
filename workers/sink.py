"""Sink worker: results stream -> heatmap PNGs + the line's decisions stream (once per frame) + Prometheus.

Each result is published with ``publish_decisions_once`` (a ``published:<frame_id>`` marker holding the frames-stream
entry ids published under that id, updated atomically with the XADD), so a redelivered or twice-scored frame never
yields two published decisions, while a different frame that reuses a frame_id still gets its own (flagged
``frame_id_reused`` in its metadata) and its own overlay file.

Results without an anomaly map (passes) are published by the main thread, a whole read in one round trip, and
acknowledged (and deleted) in one transaction. Results with a map (failed frames; all frames with
``sink.save_all_heatmaps``) go to a ``HeatmapWriter`` thread through a bounded queue, so drawing and PNG-encoding
overlays never holds up the other decisions: it fetches the original frame from the frames stream, writes the
overlay, then publishes the decision (whose ``heatmap_ref`` therefore names a file that exists) and only then
acknowledges the result. A crash in between leaves the result pending, to be redelivered; an overlay already on disk
is not drawn again, so each failed frame's overlay is written once. The writer also applies heatmap retention.
The results handed to the writer are kept from claims (the sink's own too) and the heartbeat fresh while it is slow
(a disk stall), as a scorer keeps a slow batch (``workers.in_hand``): up to ``worker.max_batch_duration_s`` on one
overlay (a batch of them may take longer, each overlay written counting as progress), after which they are left to the
claims and the loop stops beating (/healthz and /livez turn 503, and the process exits 3 if still stuck a heartbeat TTL
later) until the writer is back.

Every result is handled on its own. A decision is never held back for its heatmap: an overlay that cannot be written
leaves the decision published without ``heatmap_ref`` and with ``metadata["heatmap_error"]`` saying why; a result
whose map is malformed (at once) or that was delivered more than ``streams.max_deliveries`` times (e.g. it crashed
the sink) is also dead-lettered. On start the sink walks its own pending results once, then leaves what is still
pending to the claims.
On drain the writer finishes its queue before the sink exits, within ``worker.drain_timeout_s``: a stop comes through
a reader waiting on a stalled writer's full queue, and what the writer has not committed by then stays pending, for a
peer's claims. Stream lag and pending counts of both consumer groups are exported every second."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.codec import CodecError, CodecErrorReason, decode_decision, decode_frame, decode_pixels, encode_decision
from pipeline.messages import Decision, StageTimings, now_ns
from pipeline.streams import (
    ENTRY_TRIMMED,
    PAYLOAD,
    SINK_GROUP,
    Commit,
    DeadLetter,
    DecisionToPublish,
    LineKeys,
    Publication,
    StreamEntry,
    StreamsUnavailable,
)
from workers.heatmaps import HeatmapStore
from workers.in_hand import InHand
from workers.lifecycle import WorkerRuntime

logger = logging.getLogger(__name__)
READ_COUNT = 64
HEATMAP_QUEUE = 32  # results (anomaly map ~100 kB each) waiting for the writer; a full queue holds up the reader
STOP_POLL_S = 0.1  # how soon a reader waiting on the writer's full queue sees a stop


# metadata keys the sink adds to a published decision
HEATMAP_ERROR = "heatmap_error"  # why the decision of a frame with an anomaly map has no heatmap_ref
FRAME_ID_REUSED = "frame_id_reused"  # another frame with this frame_id already has a decision


@dataclass(frozen=True)
class HeatmapJob:
    """A result whose overlay is to be written before its decision is published and the result acknowledged."""

    entry_id: str
    decision: Decision
    anomaly_map: np.ndarray  # (map_size, map_size) float32, checked against map_size


@dataclass(frozen=True)
class ToPublish:
    """A decision to publish, its overlay's path (None: none) and, when an overlay was due but is missing, why."""

    decision: Decision
    heatmap_ref: str | None = None
    heatmap_error: str | None = None


class HeatmapWriter:
    """The sink's writer thread: overlay PNG, then publish, then acknowledge, for results that carry a map."""

    def __init__(self, sink: SinkWorker, capacity: int = HEATMAP_QUEUE) -> None:
        self.sink = sink
        self.jobs: queue.Queue[HeatmapJob | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="heatmap-writer", daemon=True)
        self._thread.start()

    def submit(self, job: HeatmapJob) -> bool:
        """Queue ``job``; waits while the queue is full (backpressure on the sink's reader), but only until the sink
        is told to stop: False then, ``job`` not queued."""
        stop = self.sink.runtime.stop
        while True:
            try:
                self.jobs.put(job, timeout=STOP_POLL_S)
                return True
            except queue.Full:
                if stop.is_set():
                    return False

    def flush(self) -> None:
        """Wait until every job queued so far has been written, published and acknowledged, or the sink is told to
        stop."""
        stop = self.sink.runtime.stop
        with self.jobs.all_tasks_done:
            while self.jobs.unfinished_tasks and not stop.is_set():
                self.jobs.all_tasks_done.wait(STOP_POLL_S)

    def close(self, timeout_s: float) -> None:
        """Finish the queued jobs and stop the thread, waiting at most ``timeout_s`` (a stalled disk: what it has
        not committed stays pending, for the claims)."""
        deadline = time.monotonic() + timeout_s
        try:
            self.jobs.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        else:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.error("heatmap writer did not finish its queue in time; its results stay pending for the claims",
                         extra={"queued": self.jobs.qsize()})  # fmt: skip

    def _take(self) -> list[HeatmapJob | None]:
        """The next job (waiting up to the prune interval) and whatever else is queued behind it."""
        try:
            taken = [self.jobs.get(timeout=self.sink.heatmaps.prune_every_s or None)]
        except queue.Empty:
            return []
        while taken[-1] is not None and len(taken) < READ_COUNT:
            try:
                taken.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            jobs = [job for job in taken if job is not None]
            try:
                if jobs:
                    self.sink.held.step()
                    self.sink.write_and_publish(jobs)
                self.sink.heatmaps.maybe_prune()
            except StreamsUnavailable as error:  # only once the drain deadline has passed: results stay pending
                logger.error("heatmap writer gave up on redis", extra={"error": str(error), "jobs": len(jobs)})
            except Exception:
                logger.exception("heatmap writer failed; results stay pending for redelivery")
            finally:
                self.sink.held.release(job.entry_id for job in jobs)  # committed, or left pending for redelivery
                for _ in taken:
                    self.jobs.task_done()
            if taken and taken[-1] is None:
                return


class SinkWorker:
    """Consumes one line's results stream in the ``sinks`` group."""

    def __init__(self, runtime: WorkerRuntime, line_id: str) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.keys = LineKeys(self.config.streams.prefix, line_id)
        sink = self.config.sink
        self.heatmaps = HeatmapStore(sink.heatmap_dir, sink.heatmap_max_files, sink.heatmap_max_age_s)
        self.held = InHand(runtime, self.keys.results, SINK_GROUP, self.config.worker.max_batch_duration_s)
        self.writer = HeatmapWriter(self)
        self._next_stats = 0.0
        self._next_claim = 0.0

    # -- heatmaps (writer thread) ------------------------------------------------------------------------------
    def _overlay_image(self, decision: Decision, anomaly_map: np.ndarray, payload: bytes | None) -> np.ndarray:
        """The original frame's pixels, or a grey canvas when the frame has been trimmed from Redis."""
        if payload is not None:
            try:
                return decode_pixels(decode_frame(payload))
            except CodecError as error:
                logger.warning(
                    "frame for heatmap unreadable", extra={"frame_id": decision.frame_id, "error": str(error)}
                )
        side = anomaly_map.shape[0]
        return np.full((side, side, 3), 128, dtype=np.uint8)

    def _write_heatmap(self, job: HeatmapJob, path: Path, payload: bytes | None) -> str | None:
        """Draw and write one overlay; None when that failed (the decision is then published without it)."""
        decision = job.decision
        try:
            image = self._overlay_image(decision, job.anomaly_map, payload)
            written = self.heatmaps.write(path, image, job.anomaly_map, decision.threshold, decision.score)
        except Exception as error:  # one frame's overlay must never hold up the other decisions
            logger.error(
                "heatmap not written; decision published without it",
                extra={"frame_id": decision.frame_id[:200], "path": str(path), "error": str(error)[:500]},
            )
            self.runtime.metrics.heatmap_failures.labels(decision.line_id).inc()
            return None
        self.runtime.metrics.heatmaps.labels(decision.line_id).inc()
        return str(written)

    def write_and_publish(self, jobs: Sequence[HeatmapJob]) -> int:
        """Write each job's overlay (unless an earlier delivery did), publish its decision once, acknowledge.

        Each job stands alone: one whose overlay cannot be written is published without it (flagged with
        ``heatmap_error``) along with the others. Only a Redis failure leaves the jobs pending, for redelivery."""
        client = self.runtime.client
        refs: dict[str, str | None] = {}  # entry id -> its overlay's path (None: not written)
        to_draw: dict[Path, HeatmapJob] = {}  # one overlay per frame, even when a batch holds it twice
        waiting: dict[str, Path] = {}  # entry id -> the overlay it waits for
        for job in jobs:
            decision = job.decision
            path = self.heatmaps.path_for(decision.line_id, decision.frame_id, decision.frame_entry_id)
            try:
                already_drawn = path.exists()
            except OSError as error:  # e.g. heatmap_dir unreadable: published without heatmap, counted
                logger.error("heatmap path unusable", extra={"path": str(path)[:300], "error": str(error)})
                self.runtime.metrics.heatmap_failures.labels(decision.line_id).inc()
                continue
            if already_drawn:
                refs[job.entry_id] = str(path)  # drawn for an earlier delivery of this frame
            else:
                to_draw.setdefault(path, job)
                waiting[job.entry_id] = path
        with_frame = [job for job in to_draw.values() if job.decision.frame_entry_id]
        payloads = dict(
            zip(
                [job.entry_id for job in with_frame],
                client.fetch_many(self.keys.frames, [job.decision.frame_entry_id or "" for job in with_frame]),
                strict=True,
            )
        )
        drawn: dict[Path, str | None] = {}
        for path, job in to_draw.items():
            # each overlay is progress: up to READ_COUNT of them on a slow disk, together past max_batch_duration_s,
            # are not a hung writer (taken for one, the sink stopped beating and then exited 3, b23e049)
            self.held.step()
            drawn[path] = self._write_heatmap(job, path, payloads.get(job.entry_id))
        refs.update({entry_id: drawn[path] for entry_id, path in waiting.items()})
        items = []
        for job in jobs:
            ref = refs.get(job.entry_id)
            items.append(ToPublish(job.decision, ref, None if ref else "heatmap_failed"))
        published = self._publish(items)
        commit = Commit(acks=[job.entry_id for job in jobs], delete_acked=True)
        client.commit(self.keys.results, SINK_GROUP, commit, self.keys.deadletter)
        return published

    # -- publishing --------------------------------------------------------------------------------------------
    def _publish(self, items: Sequence[ToPublish]) -> int:
        """Publish each decision unless its frame already has one; returns how many were.

        A different frame that reuses a frame_id (another frames-stream entry) is published too, flagged with
        ``frame_id_reused``: a verdict for every frame matters more than unique ids downstream."""
        published_at = now_ns()
        finals = [self._final(item, published_at) for item in items]
        outcomes = self.runtime.client.publish_decisions_once(
            self.keys,
            [
                DecisionToPublish(
                    final.frame_id,
                    final.frame_entry_id or "",
                    encode_decision(final),
                    encode_decision(final.model_copy(update={"metadata": {**final.metadata, FRAME_ID_REUSED: True}})),
                )
                for final in finals
            ],
            self.config.streams.published_ttl_s,
        )
        for final, outcome in zip(finals, outcomes, strict=True):
            if outcome is Publication.DUPLICATE:
                self.runtime.metrics.duplicates.labels(final.line_id).inc()
                logger.info("duplicate decision not published again", extra={"frame_id": final.frame_id[:200]})
                continue
            if outcome is Publication.PUBLISHED_FRAME_ID_REUSED:
                logger.warning(
                    "frame_id reused by a different frame; its decision is published too, flagged frame_id_reused",
                    extra={"frame_id": final.frame_id[:200], "frame_entry_id": final.frame_entry_id},
                )
            self.runtime.metrics.observe_decision(final, published_at)
            if final.model_id:
                self.runtime.metrics.set_model(final.line_id, final.model_id)
        return sum(outcome is not Publication.DUPLICATE for outcome in outcomes)

    @staticmethod
    def _final(item: ToPublish, published_at: int) -> Decision:
        decision = item.decision
        publish_s = max(0.0, (published_at - decision.decided_at_ns) / 1e9) if decision.decided_at_ns else 0.0
        timings = StageTimings(**{**decision.timings.model_dump(), "publish_s": publish_s})
        metadata = decision.metadata
        if item.heatmap_error:
            metadata = {**metadata, HEATMAP_ERROR: item.heatmap_error}
        return decision.model_copy(
            update={
                "heatmap_ref": item.heatmap_ref,
                "published_at_ns": published_at,
                "timings": timings,
                "anomaly_map": None,
                "map_size": None,
                "metadata": metadata,
            }
        )

    def _heatmap_job(self, entry: StreamEntry, decision: Decision) -> HeatmapJob | DeadLetter:
        """A writer job for a result with a map, or why it cannot have a heatmap (its decision goes out without)."""
        max_deliveries = self.config.streams.max_deliveries
        if entry.deliveries > max_deliveries:
            detail = (
                f"delivered {entry.deliveries} times (streams.max_deliveries={max_deliveries}) without its heatmap "
                "written; decision published without heatmap"
            )
            return DeadLetter(entry.entry_id, entry.payload, "max_deliveries_exceeded", detail, decision.frame_id)
        try:
            anomaly_map = decision.anomaly_map_array()
        except ValueError as error:
            detail = f"{error}; decision published without heatmap"
            return DeadLetter(entry.entry_id, entry.payload, "invalid_anomaly_map", detail, decision.frame_id)
        if anomaly_map is None:
            detail = "anomaly_map without map_size; decision published without heatmap"
            return DeadLetter(entry.entry_id, entry.payload, "invalid_anomaly_map", detail, decision.frame_id)
        return HeatmapJob(entry.entry_id, decision, anomaly_map)

    def handle(self, entries: Sequence[StreamEntry]) -> int:
        """Publish results without a map now and hand those with one to the writer; returns how many were published
        here (the writer's are published once their overlay is written, see ``writer.flush``).

        A result with a map that cannot get a heatmap (malformed map, or delivered more than
        ``streams.max_deliveries`` times) is dead-lettered and its decision published here, without heatmap and
        flagged ``heatmap_error``. An entry without a ``payload`` field holds no decision: dead-lettered
        ``not_a_message`` naming its fields (one gone before it was re-read is ``entry_trimmed``)."""
        letters: list[DeadLetter] = []
        plain: list[ToPublish] = []
        acks: list[str] = []
        jobs: list[HeatmapJob] = []
        for entry in entries:
            if entry.payload is None and entry.other_fields:  # not written by a scoring worker: no decision in it
                detail = (
                    f"entry has no '{PAYLOAD}' field (its fields: {', '.join(entry.other_fields)}); scoring workers "
                    f"publish results as XADD {self.keys.results} * {PAYLOAD} <msgpack Decision>"
                )
                letters.append(DeadLetter(entry.entry_id, None, CodecErrorReason.NOT_A_MESSAGE.value, detail))
                acks.append(entry.entry_id)
                continue
            if entry.payload is None:  # re-reading its own pending results: claims dead-letter these themselves
                letters.append(DeadLetter(entry.entry_id, None, ENTRY_TRIMMED, "result gone before the sink reread it"))
                acks.append(entry.entry_id)
                continue
            try:
                decision = decode_decision(entry.payload)
            except CodecError as error:
                letters.append(DeadLetter(entry.entry_id, entry.payload, error.reason.value, error.detail))
                acks.append(entry.entry_id)
                continue
            if decision.anomaly_map is None:
                plain.append(ToPublish(decision))
                acks.append(entry.entry_id)
                continue
            job = self._heatmap_job(entry, decision)
            if isinstance(job, HeatmapJob):
                jobs.append(job)
            else:
                letters.append(job)
                plain.append(ToPublish(decision, heatmap_error=job.reason))
                acks.append(entry.entry_id)
        published = self._publish(plain)
        # results carry anomaly maps and are read by nobody else: delete them once acknowledged to bound memory
        commit = Commit(dead_letters=letters, acks=acks, delete_acked=True)
        written = self.runtime.client.commit(self.keys.results, SINK_GROUP, commit, self.keys.deadletter)
        self.runtime.report_dead_letters(self.keys.line_id, written)
        self.held.hold(job.entry_id for job in jobs)  # until the writer is done with them (its queue may be full)
        for position, job in enumerate(jobs):
            if not self.writer.submit(job):  # stopping while the writer is stalled: left pending, for the claims
                self.held.release(left.entry_id for left in jobs[position:])
                logger.info("stopping: results not handed to the stalled heatmap writer stay pending",
                            extra={"count": len(jobs) - position, "first": job.entry_id})  # fmt: skip
                break
        return published

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + 1.0
            for stream in (self.keys.frames, self.keys.results):  # results are never trimmed: nothing to count
                stats = self.runtime.client.group_stats(stream, count_trimmed=stream == self.keys.frames)
                self.runtime.metrics.observe_groups(stream, stats)

    def run(self) -> None:
        self.runtime.client.ensure_group(self.keys.results, SINK_GROUP)
        with self.held:
            self._serve()

    def _serve(self) -> None:
        client, name, stop = self.runtime.client, self.runtime.name, self.runtime.stop
        streams = self.config.streams
        after_id = "0"  # walk the pending list once: an entry that stays pending is left to the claims
        while not stop.is_set():
            own = client.read_own_pending(self.keys.results, SINK_GROUP, name, READ_COUNT, after_id)
            if not own:
                break
            self.handle(own)
            self.writer.flush()  # the writer's results stay pending until done: do not read them again
            after_id = own[-1].entry_id
        while not stop.is_set():
            if not self.held.hung():  # a writer stuck past the bound: no beat, so the sink turns 503 as a scorer does
                self.runtime.heartbeat.beat("ok", line=self.keys.line_id)
            if time.monotonic() >= self._next_claim:
                self._next_claim = time.monotonic() + streams.claim_idle_ms / 2000.0
                claimed = client.claim_stale(self.keys.results, SINK_GROUP, name, streams.claim_idle_ms, READ_COUNT,
                                             self.keys.deadletter)  # fmt: skip
                self.runtime.report_dead_letters(self.keys.line_id, claimed.dead_letters)
                self.handle(claimed.entries)
                client.forget_idle_consumers(self.keys.results, SINK_GROUP, streams.forget_consumers_after_ms, name)
            self.handle(client.read_new(self.keys.results, SINK_GROUP, name, READ_COUNT, streams.block_ms))
            self._housekeeping()
        self.runtime.heartbeat.beat("draining", force=True)
        client.retry_deadline = time.monotonic() + self.config.worker.drain_timeout_s
        self.writer.close(self.config.worker.drain_timeout_s)
