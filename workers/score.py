"""Scoring worker: frames stream -> dynamic batches -> Scorer -> results stream, acknowledging only after publishing.

Loop: re-read own pending entries first, then repeatedly collect a batch (``max_batch`` frames or ``max_wait_ms``),
decode its pixels in a thread pool while the previous batch is on the model, score, and commit results, dead
letters and acks in one transaction. Entries idle on dead consumers are claimed every ``claim_idle_ms / 2`` (those
trimmed meanwhile are dead-lettered by the claim itself); an entry delivered more than ``max_deliveries`` times is
dead-lettered. The entries in hand are kept from peers' claims, and the heartbeat fresh, while a batch takes long,
up to ``worker.max_batch_duration_s`` (``workers.in_hand``). A frame that cannot be decoded gets a dead-letter
entry and, when its frame_id can be read, an ``error`` decision; the rest of its batch is scored. A frame of another
line (its ``line_id`` is not this worker's) is dead-lettered (``wrong_line``) and gets no decision on this line.
A frame the model cannot score as it is (of another aspect than its inspection mask: a camera set to another
region) gets an ``error`` decision (``wrong_aspect``) and is not scored; the rest of its batch is.
An uncalibrated model yields ``error`` decisions (reason ``uncalibrated``) that still carry the score. The model
follows the line's Redis model key: a new directory is loaded in the background and swapped in between batches, so no
frame is lost or scored twice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.batching import check_one_to_one, collect_batch
from pipeline.codec import CodecError, CodecErrorReason, decode_frame, decode_pixels, encode_decision, peek_frame_ref
from pipeline.config import Config
from pipeline.health import StartingBeat
from pipeline.messages import Decision, Frame, StageTimings, Verdict, error_decision, now_ns, pack_anomaly_map
from pipeline.streams import (
    ENTRY_TRIMMED,
    PAYLOAD,
    SCORER_GROUP,
    Commit,
    DeadLetter,
    LineKeys,
    StreamEntry,
    entry_time_s,
)
from workers.in_hand import InHand
from workers.lifecycle import WorkerRuntime

logger = logging.getLogger(__name__)


class BatchTimings(Protocol):
    backbone_s: float
    search_s: float
    postprocess_s: float


class ScoredBatch(Protocol):
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, S, S)
    timings: BatchTimings
    shifted: np.ndarray  # (N,) bool: scored again at shifted views
    unregistered: np.ndarray | None  # (N,) bool: not registered by a registering model; None: model does not register


class ThresholdLike(Protocol):
    value: float


class ScorerLike(Protocol):
    """What the worker needs of ``models.scorer.Scorer``; ``threshold`` is None until the model is calibrated."""

    model_id: str
    threshold: ThresholdLike | None

    def score(self, images: Sequence[np.ndarray]) -> ScoredBatch: ...

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        """Why the model cannot score a frame of this size (its inspection mask would not fit), or None."""
        ...


ModelLoader = Callable[[Path], ScorerLike]


UNCALIBRATED = "the model has no pass/fail threshold: run `lineinspect calibrate --model DIR --good DIR`"
WRONG_LINE = "wrong_line"  # dead-letter reason: a frame whose line_id is another line's
WRONG_ASPECT = "wrong_aspect"  # error reason: a frame of another aspect than the model's inspection mask


# GNU OpenMP's default: a thread that finishes its share of a parallel region busy-waits ~300,000 spins for the next
# one. When another process holds a core, the scorer's regions (every backbone layer, faiss's search) wait for their
# descheduled thread while its sibling spins: one busy loop beside a 2-thread scorer on 2 cores cut it from 33 to
# 5 images/s; with 10,000 spins it kept 12, and lost about 7% when quiet (benchmarks/RESULTS.md 2, session 9).
# torch and faiss each ship their own libgomp; both read this when they load.
OPENMP_SPIN_COUNT = "10000"


def limit_threads(threads: int) -> None:
    """Cap torch's (OpenMP's) threads at ``threads`` (0: leave the default) and shorten OpenMP's busy-wait (unless
    GOMP_SPINCOUNT is set) so a scorer sharing its host with busy processes does not stall. Call before torch and
    faiss are imported: the OpenMP runtimes read both when they load (``torch.set_num_threads`` alone does not reach
    threads started before)."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    if threads <= 0:
        return
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def load_model(device: str) -> ModelLoader:
    """The production loader: ``models.artifact.load_scorer`` (imports torch only when called), then one warm-up
    call so the first real batch (or the first batch after a hot swap) is not slowed by lazy initialisation."""

    def load(model_dir: Path) -> ScorerLike:
        from models.artifact import load_scorer
        from models.native import configure_native_libraries, faiss_openblas_core

        scorer = load_scorer(model_dir, device=device)
        native = configure_native_libraries()  # applied when models was imported; logged for slow-node diagnosis
        logger.info("native libraries", extra={"openblas_core_type": native.openblas_core_type,
                                               "faiss_openblas_core": faiss_openblas_core(),
                                               "malloc_tuned": native.malloc_tuned})  # fmt: skip
        scorer.warm_up()  # a grey frame of the shape the model takes
        return scorer  # type: ignore[return-value]

    return load


class ModelSlot:
    """The line's current model; follows the Redis model key, loading new versions in a background thread. The first
    load beats "starting" (alive, not ready) up to ``worker.max_startup_s`` (``pipeline.health.StartingBeat``)."""

    def __init__(self, runtime: WorkerRuntime, keys: LineKeys, loader: ModelLoader, initial_dir: Path | None) -> None:
        self.runtime, self.keys, self.loader = runtime, keys, loader
        # absolute: the key it may announce it under is read by workers started in other directories
        initial_dir = initial_dir.absolute() if initial_dir is not None else None  # a symlink stays one (flips)
        announced = runtime.client.get_model_dir(keys)
        if announced is None and initial_dir is None:
            msg = f"no model for line {keys.line_id}: pass --model DIR or set worker.model_dir (or {keys.model})"
            raise ValueError(msg)
        if announced is not None and initial_dir is not None and Path(announced) != initial_dir:
            logger.warning("line's model key overrides --model", extra={"model_dir": announced})
        self._failed: tuple[str, str | None] | None = None
        first = announced if announced is not None else str(initial_dir)
        with StartingBeat(runtime.heartbeat, runtime.config.worker.max_startup_s, loading=first) as starting:
            self.model_dir, self.scorer = self._first_model(announced, initial_dir, starting)
            # Announced only once loaded: a --model that does not load, announced first, was what every worker
            # started later was told to use. A peer that announced first while this one loaded is followed now.
            if announced is None and not runtime.client.set_model_dir(keys, self.model_dir, only_if_absent=True):
                self._follow_peer(starting)
        runtime.metrics.set_model(keys.line_id, self.scorer.model_id)
        self._loading: threading.Thread | None = None
        self._ready: tuple[str, ScorerLike] | None = None
        self._next_poll = 0.0

    def _first_model(
        self, announced: str | None, initial_dir: Path | None, starting: StartingBeat
    ) -> tuple[str, ScorerLike]:
        """The announced model; if it does not load, ``initial_dir`` (``--model``) when that loads; with no model
        announced, ``initial_dir``. The key is left as it is (whoever promoted the broken model fixes it; the worker
        swaps to whatever it names next) and the broken directory is not retried until the key or its manifest
        changes. Nothing loads: ValueError naming the directory and why, the worker's one-line exit."""
        if announced is None:
            assert initial_dir is not None
            return self._load_option(initial_dir)
        try:
            return announced, self.loader(Path(announced))
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            if initial_dir is None or Path(announced) == initial_dir:
                msg = f"model {announced} (named by {self.keys.model}) does not load: {reason}"
                raise ValueError(msg) from error
            self._failed = (announced, manifest_model_id(Path(announced)))
        logger.error(
            "the line's model key names a model that does not load; starting with --model instead",
            extra={"announced_model_dir": announced, "model_dir": str(initial_dir), "error": reason},
        )
        starting.show(loading=str(initial_dir))
        return self._load_option(initial_dir, f"model {announced} (named by {self.keys.model}) does not load: {reason}")

    def _load_option(self, initial_dir: Path, failed_before: str = "") -> tuple[str, ScorerLike]:
        """``initial_dir`` (``--model``) and its scorer; ValueError naming it, after ``failed_before`` (the announced
        model's failure) when given, if it does not load."""
        try:
            return str(initial_dir), self.loader(initial_dir)
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            msg = (f"{failed_before}; nor does --model {initial_dir}: {reason}" if failed_before
                   else f"model {initial_dir} (--model or worker.model_dir) does not load: {reason}")  # fmt: skip
            raise ValueError(msg) from error

    def _follow_peer(self, starting: StartingBeat) -> None:
        """The key was unset when this worker began loading ``--model`` and a peer announced its model meanwhile (two
        scorers started together): load and use the peer's before scoring a frame, as a worker started after it
        would, rather than score with this one's until a background reload swaps it (two models' verdicts on one
        line). If it does not load, keep this worker's model (logged; not retried until the key or its manifest
        changes, as after a failed promote)."""
        announced = self.runtime.client.get_model_dir(self.keys)
        if announced is None:  # announced and removed again meanwhile: refresh() announces this model
            return
        version = manifest_model_id(Path(announced))
        if version == self.scorer.model_id:
            return
        logger.warning(
            "a peer announced its model on the line's model key while this worker loaded --model; following the key",
            extra={"model_dir": announced, "option_model_dir": self.model_dir},
        )
        starting.show(loading=announced)
        try:
            self.model_dir, self.scorer = announced, self.loader(Path(announced))
        except Exception as error:
            logger.error("the line's model key names a model that does not load; keeping --model",
                         extra={"announced_model_dir": announced, "model_dir": self.model_dir,
                                "error": f"{type(error).__name__}: {error}"})  # fmt: skip
            self._failed = (announced, version)

    def _load(self, model_dir: str, version: str | None) -> None:
        try:
            scorer = self.loader(Path(model_dir))
        except Exception as error:
            logger.error(
                "model reload failed, keeping the current model", extra={"model_dir": model_dir, "error": str(error)}
            )
            self.runtime.metrics.model_reloads.labels(self.keys.line_id, "failed").inc()
            self._failed = (model_dir, version)
            return
        self._ready = (model_dir, scorer)

    def refresh(self) -> None:
        """Between batches: swap in a loaded model, or start loading a newly announced one (checked once a second).

        A model counts as new when the key names another directory or the directory's manifest has another model
        id (e.g. a ``current`` symlink flipped to a new version). A failed load is retried only once that changes.
        """
        if self._ready is not None:
            self.model_dir, self.scorer = self._ready
            self._ready = None
            self.runtime.metrics.set_model(self.keys.line_id, self.scorer.model_id)
            self.runtime.metrics.model_reloads.labels(self.keys.line_id, "ok").inc()
            logger.info("model swapped", extra={"model_dir": self.model_dir, "model_id": self.scorer.model_id})
        now = time.monotonic()
        if now < self._next_poll or (self._loading is not None and self._loading.is_alive()):
            return
        self._next_poll = now + 1.0
        announced = self.runtime.client.get_model_dir(self.keys)
        if not announced:
            # The key is gone (Redis restarted without its data): announce the model in use again. Otherwise the
            # next worker to start sets it to its own --model, often the line's first version, and every running
            # worker follows it back there.
            if self.runtime.client.set_model_dir(self.keys, self.model_dir, only_if_absent=True):
                logger.warning("the line's model key was gone; announced the model in use again",
                               extra={"model_dir": self.model_dir, "key": self.keys.model})  # fmt: skip
            return
        version = manifest_model_id(Path(announced))
        if version == self.scorer.model_id or (announced, version) == self._failed:
            return
        logger.info("new model announced, loading", extra={"model_dir": announced, "model_id": version})
        self._loading = threading.Thread(target=self._load, args=(announced, version), name="model-load", daemon=True)
        self._loading.start()


def manifest_model_id(model_dir: Path) -> str | None:
    """The ``model_id`` in a model directory's manifest.json, or None when it cannot be read."""
    try:
        return str(json.loads((model_dir / "manifest.json").read_text())["model_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Pending:
    """One entry in hand: its frame once parsed and the future of its decoded pixels."""

    entry: StreamEntry
    read_at_s: float
    frame: Frame | None = None
    pixels: Future[tuple[np.ndarray, float]] | None = None
    decision: Decision | None = None
    dead_letter: DeadLetter | None = None


@dataclass
class BatchOutcome:
    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def _timed_decode(frame: Frame, max_pixels: int) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    return decode_pixels(frame, max_pixels), time.perf_counter() - started


class ScoreWorker:
    """Consumes one line's frames stream in the ``scorers`` group as consumer ``runtime.name``."""

    def __init__(self, runtime: WorkerRuntime, line_id: str, models: ModelSlot) -> None:
        self.runtime = runtime
        self.config: Config = runtime.config
        self.keys = LineKeys(self.config.streams.prefix, line_id)
        self.models = models
        self.pool = ThreadPoolExecutor(self.config.worker.decode_threads, thread_name_prefix="decode")
        self.held = InHand(runtime, self.keys.frames, SCORER_GROUP, self.config.worker.max_batch_duration_s)
        self._next_claim = 0.0
        self._next_backlog_warning = 0.0  # 0: the sink is not behind

    # -- reading -----------------------------------------------------------------------------------------------
    def _fetch(self, max_items: int, wait_s: float | None) -> list[StreamEntry]:
        block_ms = None if wait_s is None else max(1, int(wait_s * 1000))
        return self.runtime.client.read_new(self.keys.frames, SCORER_GROUP, self.runtime.name, max_items, block_ms)

    def _claim_idle(self) -> list[StreamEntry]:
        """Entries pending on any consumer longer than claim_idle_ms (a dead worker's), at most every claim_idle/2."""
        client, settings = self.runtime.client, self.config.streams
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + settings.claim_idle_ms / 2000.0
        count, name = self.config.worker.max_batch, self.runtime.name
        claimed = client.claim_stale(self.keys.frames, SCORER_GROUP, name, settings.claim_idle_ms, count,
                                     self.keys.deadletter)  # fmt: skip
        self.runtime.report_dead_letters(self.keys.line_id, claimed.dead_letters)
        client.forget_idle_consumers(self.keys.frames, SCORER_GROUP, settings.forget_consumers_after_ms, name)
        if len(claimed.entries) + len(claimed.dead_letters) >= count:
            self._next_claim = 0.0  # a full page: there may be more to take over
        if claimed.entries:
            logger.info("claimed idle entries", extra={"count": len(claimed.entries),
                                                       "first": claimed.entries[0].entry_id})  # fmt: skip
        return claimed.entries

    def prepare(self, entries: Sequence[StreamEntry]) -> list[Pending]:
        """Parse each entry and start decoding its pixels; unusable entries are marked for the dead-letter stream."""
        prepared: list[Pending] = []
        stale_after_ms = self.config.worker.stale_after_ms
        self.held.hold(entry.entry_id for entry in entries)
        for entry in entries:
            item = Pending(entry, read_at_s=time.time())
            prepared.append(item)
            if entry.payload is None and entry.other_fields:  # published without the payload field
                detail = (
                    f"entry has no '{PAYLOAD}' field (its fields: {', '.join(entry.other_fields)}); publish "
                    f"frames as XADD {self.keys.frames} MAXLEN ~ <streams.maxlen> * {PAYLOAD} <msgpack map>"
                )
                self._reject(item, CodecErrorReason.NOT_A_MESSAGE.value, detail)
                continue
            if entry.payload is None:  # only when re-reading own pending entries: claims dead-letter these themselves
                detail = "trimmed from the stream before this worker re-read it"
                item.dead_letter = DeadLetter(entry.entry_id, None, ENTRY_TRIMMED, detail)
                continue
            if entry.deliveries > self.config.streams.max_deliveries:
                detail = (
                    f"delivered {entry.deliveries} times (streams.max_deliveries={self.config.streams.max_deliveries})"
                )
                self._reject(item, "max_deliveries_exceeded", detail)
                continue
            try:
                item.frame = decode_frame(entry.payload, self.config.streams.max_frame_bytes)
            except CodecError as error:
                self._reject(item, error.reason.value, error.detail)
                continue
            except Exception as error:  # a decoder bug on one entry must not stop the others
                self._reject(item, CodecErrorReason.NOT_A_MESSAGE.value, f"{type(error).__name__}: {error}")
                continue
            if item.frame.line_id != self.keys.line_id:
                detail = f"frame for {item.frame.line_id} on {self.keys.line_id}'s stream {self.keys.frames}"
                letter = DeadLetter(entry.entry_id, entry.payload, WRONG_LINE, detail, item.frame.frame_id)
                item.dead_letter, item.frame = letter, None
                continue
            age_ms = (now_ns() - item.frame.captured_at_ns) / 1e6
            if stale_after_ms is not None and age_ms > stale_after_ms:
                detail = f"frame was {age_ms:.0f} ms old, limit worker.stale_after_ms={stale_after_ms}"
                timings = self._queue_timings(item)
                item.decision = error_decision(item.frame, "stale", detail, timings, item.entry.entry_id)
                continue
            item.pixels = self.pool.submit(_timed_decode, item.frame, self.config.streams.max_frame_pixels)
        return prepared

    def _reject(self, item: Pending, reason: str, detail: str) -> None:
        """Dead-letter an entry that is not a usable frame; when its frame_id (and line) can be read from the
        payload, the frame also gets an ``error`` decision, so every frame that can be named gets one."""
        entry = item.entry
        ref = peek_frame_ref(entry.payload, self.keys.line_id, int(entry_time_s(entry.entry_id) * 1e9))
        item.dead_letter = DeadLetter(entry.entry_id, entry.payload, reason, detail, ref.frame_id if ref else "")
        if ref is not None and ref.line_id == self.keys.line_id:
            item.decision = error_decision(ref, reason, detail, self._queue_timings(item), entry.entry_id)

    @staticmethod
    def _queue_timings(item: Pending) -> StageTimings:
        return StageTimings(queue_wait_s=max(0.0, item.read_at_s - entry_time_s(item.entry.entry_id)))

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, batch: Sequence[Pending]) -> BatchOutcome:
        """Decisions and dead letters for a prepared batch; one bad frame never fails the others."""
        outcome = BatchOutcome()
        ready: list[tuple[Pending, np.ndarray, float]] = []
        for item in batch:
            if item.pixels is not None:
                try:
                    image, decode_s = item.pixels.result()
                    ready.append((item, image, decode_s))
                except CodecError as error:  # decode_pixels turns every failure of one frame into one
                    assert item.frame is not None
                    reason, detail = error.reason.value, error.detail
                    frame_id = item.frame.frame_id
                    item.dead_letter = DeadLetter(item.entry.entry_id, item.entry.payload, reason, detail, frame_id)
                    item.decision = error_decision(
                        item.frame, reason, detail, self._queue_timings(item), item.entry.entry_id
                    )
            if item.dead_letter is not None:
                outcome.dead_letters.append(item.dead_letter)
            if item.decision is not None:
                outcome.decisions.append(item.decision)
        if ready:
            outcome.decisions.extend(self._score_images(ready))
        return outcome

    def _score_images(self, ready: list[tuple[Pending, np.ndarray, float]]) -> list[Decision]:
        scorer = self.models.scorer
        refused, ready = self._refuse_mismatched(scorer, ready)
        if not ready:
            return refused
        try:
            result = scorer.score([image for _, image, _ in ready])
            check_one_to_one(len(ready), result.scores, "scores")
            check_one_to_one(len(ready), result.maps, "anomaly maps")
            check_one_to_one(len(ready), result.shifted, "shift flags")
        except Exception as error:
            logger.exception("scoring failed for a batch", extra={"frames": len(ready)})
            return refused + [
                error_decision(
                    item.frame,
                    "scoring_failed",
                    f"{type(error).__name__}: {error}",
                    self._queue_timings(item),
                    item.entry.entry_id,
                )
                for item, _, _ in ready
                if item.frame is not None
            ]
        self.runtime.metrics.batch_size.labels(self.keys.line_id).observe(len(ready))
        self.runtime.metrics.shifted_frames.labels(self.keys.line_id).inc(int(np.count_nonzero(result.shifted)))
        if result.unregistered is not None:
            unregistered = int(np.count_nonzero(result.unregistered))
            self.runtime.metrics.unregistered_frames.labels(self.keys.line_id).inc(unregistered)
        threshold = None if scorer.threshold is None else float(scorer.threshold.value)
        decided_at = now_ns()
        decisions = refused
        for (item, _, decode_s), score, anomaly_map in zip(ready, result.scores, result.maps, strict=True):
            assert item.frame is not None
            verdict: Verdict = "error" if threshold is None else ("fail" if float(score) > threshold else "pass")
            map_size, map_bytes = None, None
            if verdict == "fail" or self.config.sink.save_all_heatmaps:
                map_size, map_bytes = pack_anomaly_map(anomaly_map)
            timings = StageTimings(
                queue_wait_s=self._queue_timings(item).queue_wait_s,
                decode_s=decode_s,
                backbone_s=result.timings.backbone_s,
                search_s=result.timings.search_s,
                postprocess_s=result.timings.postprocess_s,
            )
            frame = item.frame
            decisions.append(
                Decision(
                    frame_id=frame.frame_id,
                    line_id=frame.line_id,
                    camera_id=frame.camera_id,
                    sequence=frame.sequence,
                    verdict=verdict,
                    error_reason="uncalibrated" if threshold is None else None,
                    error_detail=UNCALIBRATED if threshold is None else None,
                    score=float(score),
                    threshold=threshold,
                    model_id=scorer.model_id,
                    timings=timings,
                    captured_at_ns=frame.captured_at_ns,
                    decided_at_ns=decided_at,
                    frame_entry_id=item.entry.entry_id,
                    map_size=map_size,
                    anomaly_map=map_bytes,
                    metadata=frame.metadata,
                )
            )
        return decisions

    def _refuse_mismatched(
        self, scorer: ScorerLike, ready: list[tuple[Pending, np.ndarray, float]]
    ) -> tuple[list[Decision], list[tuple[Pending, np.ndarray, float]]]:
        """Error decisions (``wrong_aspect``) for the frames the model cannot score as they are, and the others."""
        refused: list[Decision] = []
        kept = []
        for item, image, decode_s in ready:
            mismatch = scorer.aspect_mismatch(image.shape[0], image.shape[1])
            if mismatch is None:
                kept.append((item, image, decode_s))
                continue
            assert item.frame is not None
            detail = (f"frame {item.frame.frame_id} is {mismatch}; send frames of the region the mask was drawn "
                      "over, or fit a model with a mask drawn over this camera's frames")  # fmt: skip
            timings = StageTimings(queue_wait_s=self._queue_timings(item).queue_wait_s, decode_s=decode_s)
            decision = error_decision(item.frame, WRONG_ASPECT, detail, timings, item.entry.entry_id)
            refused.append(decision.model_copy(update={"model_id": scorer.model_id}))  # whose mask refused it
        return refused, kept

    def finish(self, batch: Sequence[Pending]) -> None:
        """Score a prepared batch and commit results, dead letters and acks in one transaction."""
        if not batch:
            return
        self.held.step()
        outcome = self.score(batch)
        commit = Commit(
            appends=[(self.keys.results, encode_decision(decision)) for decision in outcome.decisions],
            dead_letters=outcome.dead_letters,
            acks=[item.entry.entry_id for item in batch],
            trim_appends=False,  # results nobody has read yet must not be trimmed: see sink_is_behind
            append_sources=[decision.frame_entry_id or "" for decision in outcome.decisions],
        )
        written = self.runtime.client.commit(self.keys.frames, SCORER_GROUP, commit, self.keys.deadletter)
        self.held.release(commit.acks)
        self.runtime.report_dead_letters(self.keys.line_id, written)  # not those a peer's claim committed first

    def sink_is_behind(self) -> bool:
        """True while ``streams.maxlen`` results wait for the sink (it is down or slower than the scorers).

        Scorers then take no new frames: the frames' lag grows, ingest stops publishing at
        ``ingest.live_queue_limit`` (file sources wait, live cameras drop their oldest frames, counted), and the
        results stream, which is never trimmed, stays bounded. Trimming it instead dropped the decisions of every
        frame scored beyond ``maxlen`` while the sink was away, without a dead letter.

        The bound is ``maxlen`` plus up to two batches per scorer: the batch in hand and the one read beside it are
        still scored and committed (holding them until the sink returns would outlast ``max_batch_duration_s`` and
        turn the scorer unhealthy), which costs memory (their anomaly maps), never a decision."""
        backlog = self.runtime.client.length(self.keys.results)
        behind = backlog >= self.config.streams.maxlen
        now = time.monotonic()
        if behind and now >= self._next_backlog_warning:
            self._next_backlog_warning = now + 30.0
            logger.warning(
                "the sink is behind: not taking new frames until it catches up",
                extra={"results_waiting": backlog, "limit": self.config.streams.maxlen, "stream": self.keys.results},
            )
        elif not behind and self._next_backlog_warning:
            self._next_backlog_warning = 0.0
            logger.info("the sink caught up: taking frames again", extra={"results_waiting": backlog})
        return behind

    # -- loop --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``runtime.stop`` is set, then finish and acknowledge what is in hand."""
        self.runtime.client.ensure_group(self.keys.frames, SCORER_GROUP)
        with self.held:
            self._serve()
        self.pool.shutdown(wait=True)

    def _serve(self) -> None:
        settings, stop = self.config.worker, self.runtime.stop
        client = self.runtime.client
        while not stop.is_set():
            own = client.read_own_pending(self.keys.frames, SCORER_GROUP, self.runtime.name, settings.max_batch)
            if not own:
                break
            self.finish(self.prepare(own))
        in_hand: list[Pending] = []
        while not stop.is_set():
            self.held.step()
            self.models.refresh()
            self.runtime.heartbeat.beat("ok", model_id=self.models.scorer.model_id, line=self.keys.line_id)
            if self.sink_is_behind():
                self.finish(in_hand)
                in_hand = []
                stop.wait(self.config.streams.block_ms / 1000.0)
                continue
            recovered = self._claim_idle()
            if recovered:  # prepared (so held) first: kept from peers' claims while in_hand is scored before them
                upcoming = self.prepare(recovered)
                self.finish(in_hand)
                self.finish(upcoming)
                in_hand = []
                continue
            if in_hand:
                entries = self._fetch(settings.max_batch, None)
            else:
                entries = collect_batch(
                    self._fetch,
                    settings.max_batch,
                    settings.max_wait_ms / 1000.0,
                    self.config.streams.block_ms / 1000.0,
                )
            upcoming = self.prepare(entries)
            self.finish(in_hand)
            in_hand = upcoming
        self.runtime.heartbeat.beat("draining", force=True)
        client.retry_deadline = time.monotonic() + settings.drain_timeout_s
        self.finish(in_hand)
