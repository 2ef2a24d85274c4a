"""Ingest worker: sources -> Frames on the line's frames stream, with a frame-rate limit and backpressure.

Each source runs in its own capture thread and fills a ``FrameBuffer`` (a file source reads its next file only
when ``ingest.max_fps`` allows, so ``captured_at`` is the time it was read); the publisher, woken by each capture,
takes frames round-robin and publishes all it has in one round trip (a retry after a lost reply does not publish a
frame twice) while the scorers' backlog (undelivered entries of the ``scorers`` group, asked of Redis only when the
room it last saw is used up) is below ``ingest.live_queue_limit``. When it is not, the publisher waits: file and
replay sources then block in their buffers (nothing lost), live cameras keep capturing and their buffers drop the
oldest frames (counted in ``lineinspect_dropped_frames_total``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from pipeline.codec import encode_frame, stand_in_id, validation_problems
from pipeline.messages import Frame, id_problem
from pipeline.streams import SCORER_GROUP, LineKeys
from workers.lifecycle import WorkerRuntime
from workers.sources import Capture, Source, new_frame_id

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.2  # longest the publisher sleeps without a frame (heartbeats, stop)
BACKLOG_POLL_S = 0.025  # how often a full backlog is asked again: well under one batch's scoring time


class FrameBuffer:
    """A bounded hand-off between a capture thread and the publisher.

    ``drop_oldest=True`` (live sources): ``put`` never blocks; a full buffer discards its oldest frame and counts it.
    ``drop_oldest=False``: ``put`` blocks until there is room or ``stop`` is set.
    """

    def __init__(self, capacity: int, drop_oldest: bool, on_put: threading.Event | None = None) -> None:
        if capacity < 1:
            msg = f"buffer capacity must be at least 1, got {capacity}"
            raise ValueError(msg)
        self.capacity, self.drop_oldest = capacity, drop_oldest
        self.items: collections.deque[Capture] = collections.deque()
        self.dropped = 0
        self.finished = False
        self.on_put = on_put  # set after every put and at close: wakes the publisher instead of it polling
        self._condition = threading.Condition()

    def put(self, item: Capture, stop: threading.Event) -> bool:
        """Add ``item``; returns False when it was not added because ``stop`` was set."""
        with self._condition:
            while len(self.items) >= self.capacity:
                if self.drop_oldest:
                    self.items.popleft()
                    self.dropped += 1
                    break
                if stop.is_set():
                    return False
                self._condition.wait(timeout=0.1)
            self.items.append(item)
        if self.on_put is not None:
            self.on_put.set()
        return True

    def take(self) -> Capture | None:
        with self._condition:
            if not self.items:
                return None
            item = self.items.popleft()
            self._condition.notify_all()
            return item

    def close(self) -> None:
        with self._condition:
            self.finished = True
        if self.on_put is not None:
            self.on_put.set()

    def __len__(self) -> int:
        with self._condition:
            return len(self.items)

    @property
    def exhausted(self) -> bool:
        with self._condition:
            return self.finished and not self.items


class RateLimiter:
    """Spaces events at least ``1 / max_fps`` apart; ``clock`` is injectable for tests."""

    def __init__(self, max_fps: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = 0.0 if not max_fps else 1.0 / max_fps
        self.clock = clock
        self.next_at = 0.0

    def delay(self) -> float:
        """Seconds to wait before the next event is allowed (0 = now); books the slot when it is 0."""
        now = self.clock()
        if now < self.next_at:
            return self.next_at - now
        self.next_at = max(self.next_at, now) + self.interval_s
        return 0.0


@dataclass
class Feed:
    source: Source
    buffer: FrameBuffer
    sequence: itertools.count  # type: ignore[type-arg]
    reported_drops: int = 0


class Ingestor:
    """Publishes frames from several sources onto one line's frames stream."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        line_id: str,
        sources: Sequence[Source],
        max_frames: int | None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.keys = LineKeys(self.config.streams.prefix, line_id)
        self.line_id = line_id
        self.max_frames = max_frames
        self.metadata = metadata or {}
        limit = self.config.ingest.live_queue_limit
        self.frames_ready = threading.Event()
        self.feeds = [
            Feed(source, FrameBuffer(limit, drop_oldest=source.live, on_put=self.frames_ready), itertools.count())
            for source in sources
        ]
        for feed in self.feeds:  # a series at 0 from the start, so a camera that never sends is visible
            runtime.metrics.ingested_frames.labels(line_id, feed.source.camera_id)
        self.published = 0
        self.not_sent: collections.Counter[str] = collections.Counter()  # captures not sent, by dropped reason
        self.stop_captures = threading.Event()  # set when publishing ends, whatever the reason
        self._published_ids: collections.deque[str] = collections.deque(maxlen=4 * limit)
        self._start_id = "0-0"  # the stream's last entry when publishing began

    def _capture_loop(self, feed: Feed) -> None:
        limiter = RateLimiter(self.config.ingest.max_fps)
        captures = iter(feed.source.captures())
        try:
            while not self.stop_captures.is_set():
                if not feed.source.live:  # wait for the slot first, so captured_at is when the frame was read
                    wait_s = limiter.delay()
                    while wait_s > 0:
                        if self.stop_captures.wait(wait_s):
                            return
                        wait_s = limiter.delay()
                capture = next(captures, None)
                if capture is None:
                    return
                if feed.source.live and limiter.delay() > 0:
                    continue  # live: skip frames faster than max_fps rather than fall behind
                if not feed.buffer.put(capture, self.stop_captures) or self.stop_captures.is_set():
                    return
        except Exception:
            logger.exception("source failed", extra={"camera": feed.source.camera_id})
        finally:
            feed.buffer.close()

    def backlog(self) -> int:
        """Frames not yet delivered to any scoring worker."""
        stats = self.runtime.client.group_stats(self.keys.frames).get(SCORER_GROUP)
        if stats is None:
            return 0
        if stats.lag is not None:
            return stats.lag
        last = tuple(int(part) for part in stats.last_delivered_id.split("-"))
        return sum(1 for entry_id in self._published_ids if tuple(int(p) for p in entry_id.split("-")) > last)

    def _frame_payload(self, feed: Feed, capture: Capture) -> tuple[str, bytes] | None:
        """``(camera_id, encoded Frame)``, or None (logged and counted as dropped) when it is too large to send or
        is no valid Frame: a replayed frame whose camera id makes too long a frame id, or whose metadata the
        replay's own keys take over the limits, must not stop the frames after it."""
        camera_id = capture.camera_id or feed.source.camera_id
        try:
            frame = Frame(
                line_id=self.line_id,
                camera_id=camera_id,
                frame_id=new_frame_id(camera_id),
                sequence=next(feed.sequence),
                captured_at_ns=capture.captured_at_ns,
                encoding=capture.encoding,
                data=capture.data,
                raw_shape=capture.raw_shape,
                raw_dtype=capture.raw_dtype,  # type: ignore[arg-type]
                metadata={**capture.metadata, **self.metadata},
            )
        except ValidationError as error:
            camera = camera_id if id_problem(camera_id) is None else stand_in_id(camera_id)  # for logs and labels
            logger.error("frame the wire refuses (invalid_fields), not sent",
                         extra={"camera": camera, "problems": validation_problems(error)})  # fmt: skip
            self._not_sent(camera, "invalid")
            return None
        payload = encode_frame(frame)
        if len(payload) > self.config.streams.max_frame_bytes:
            logger.error(
                "frame larger than streams.max_frame_bytes, not sent",
                extra={"camera": camera_id, "bytes": len(payload)},
            )
            self._not_sent(camera_id, "too_large")
            return None
        return camera_id, payload

    def _not_sent(self, camera_id: str, reason: str) -> None:
        self.not_sent[reason] += 1
        self.runtime.metrics.dropped_frames.labels(self.line_id, camera_id, reason).inc()

    def _publish(self, taken: Sequence[tuple[Feed, Capture]]) -> None:
        """Publish captures in one round trip (pipelined XADDs)."""
        frames = [framed for feed, capture in taken if (framed := self._frame_payload(feed, capture)) is not None]
        after_id = self._published_ids[-1] if self._published_ids else self._start_id  # a retry looks after it
        entry_ids = self.runtime.client.publish_many(self.keys.frames, [payload for _, payload in frames], after_id)
        self._published_ids.extend(entry_ids)
        self.published += len(entry_ids)
        for camera_id, _ in frames:
            self.runtime.metrics.ingested_frames.labels(self.line_id, camera_id).inc()

    def _take(self, ready: Sequence[Feed], count: int) -> list[tuple[Feed, Capture]]:
        """Up to ``count`` captures, round-robin: one per source per pass."""
        taken: list[tuple[Feed, Capture]] = []
        while len(taken) < count:
            before = len(taken)
            for feed in ready:
                capture = feed.buffer.take() if len(taken) < count else None
                if capture is not None:
                    taken.append((feed, capture))
            if len(taken) == before:
                break
        return taken

    def _export_drops(self) -> None:
        for feed in self.feeds:
            new = feed.buffer.dropped - feed.reported_drops
            if new:
                self.runtime.metrics.dropped_frames.labels(self.line_id, feed.source.camera_id, "backpressure").inc(new)
                feed.reported_drops += new

    def run(self) -> int:
        """Publish until every source is exhausted, ``max_frames`` are sent or stop is set; returns frames sent."""
        self.runtime.client.ensure_group(self.keys.frames, SCORER_GROUP)
        self._start_id = self.runtime.client.last_id(self.keys.frames)
        threads = [threading.Thread(target=self._capture_loop, args=(feed,), daemon=True) for feed in self.feeds]
        for thread in threads:
            thread.start()
        limit = self.config.ingest.live_queue_limit
        stop = self.runtime.stop
        room = 0  # frames the scorers' backlog can still take; Redis is asked again only when it runs out
        while not stop.is_set() and (self.max_frames is None or self.published < self.max_frames):
            self.runtime.heartbeat.beat("ok", line=self.line_id, published=self.published)
            self._export_drops()
            if all(feed.buffer.exhausted for feed in self.feeds):
                break
            self.frames_ready.clear()
            ready = [feed for feed in self.feeds if len(feed.buffer)]
            if not ready:
                self.frames_ready.wait(IDLE_WAIT_S)  # woken by the next capture (or a source ending)
                continue
            if room <= 0:
                room = limit - self.backlog()  # asked only with frames in hand, so an idle camera costs no calls
                if room <= 0:
                    stop.wait(BACKLOG_POLL_S)
                    continue
            wanted = room if self.max_frames is None else min(room, self.max_frames - self.published)
            taken = self._take(ready, wanted)
            self._publish(taken)
            room -= len(taken)
        self.stop_captures.set()
        self._export_drops()
        logger.info(
            "ingest finished", extra={"published": self.published, "dropped": sum(f.buffer.dropped for f in self.feeds)}
        )
        return self.published
