"""Record a line's frames and decisions to a file, replay them, and compare a replay's decisions with the recording.

Recording file: a sequence of msgpack maps (no pickle). The first is a header
``{"format": "lineinspect-recording", "version": 1, "line_id", "created_at_ns"}``; then
``{"kind": "frame", "entry_id", "payload"}`` (an encoded Frame with its original ``captured_at_ns``) and
``{"kind": "decision", "payload"}`` (the published Decision for a recorded frame).

Replay re-stamps ``captured_at_ns`` to the moment each frame is sent (so latency and staleness stay meaningful),
gives each frame a new ``frame_id`` and keeps the original in ``metadata["replay_of"]``. Pacing: ``speed=1``
reproduces the recorded gaps, ``speed=N`` is N times faster, ``speed=0`` sends as fast as the pipeline takes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from pipeline.codec import CodecError, decode_decision, decode_frame
from pipeline.messages import Decision, Frame, MetadataValue
from pipeline.streams import LineKeys, StreamClient
from workers.sources import Capture

logger = logging.getLogger(__name__)
FORMAT = "lineinspect-recording"
FORMAT_VERSION = 1


class RecordingError(ValueError):
    """A recording file that cannot be read."""


@dataclass
class Recording:
    """A recording's header, its baseline decisions and how many frames it holds; the frames themselves stay in
    the file and are read one at a time (``frames()``): a day of frames does not fit in memory, its decisions do."""

    path: Path
    line_id: str
    frame_count: int = 0
    decisions: dict[str, Decision] = field(default_factory=dict)  # by frame_id
    truncated_bytes: int = 0  # bytes after the last whole entry: a recorder killed mid-write, a cut copy

    def frames(self) -> Iterator[Frame]:
        """The recorded frames in order, decoded one at a time."""
        for kind, payload in _Entries(self.path):
            if kind == "frame":
                yield decode_frame(payload)


class RecordingWriter:
    """Appends frames and decisions to a recording file."""

    def __init__(self, path: Path, line_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = path.open("wb")
        self._packer = msgpack.Packer(use_bin_type=True)
        self._write({"format": FORMAT, "version": FORMAT_VERSION, "line_id": line_id, "created_at_ns": time.time_ns()})

    def _write(self, item: dict[str, Any]) -> None:
        self._file.write(self._packer.pack(item))

    def frame(self, entry_id: str, payload: bytes) -> None:
        self._write({"kind": "frame", "entry_id": entry_id, "payload": payload})

    def decision(self, payload: bytes) -> None:
        self._write({"kind": "decision", "payload": payload})

    def close(self) -> None:
        self._file.close()


class _Entries:
    """The ``(kind, payload)`` entries of a recording file after its header, read one at a time, each checked as far
    as its shape goes (``RecordingError`` naming the file otherwise). Once read to the end: ``line_id`` from the
    header and ``unread_bytes``, what follows the last whole entry (a cut file)."""

    def __init__(self, path: Path) -> None:
        self.path, self.line_id, self.unread_bytes = path, "", 0

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        path = self.path
        try:
            with path.open("rb") as handle:
                unpacker = msgpack.Unpacker(handle, raw=False, strict_map_key=True)
                header: Any = next(unpacker, None)
                if not _is_header(header):
                    msg = f"{path}: not a {FORMAT} v{FORMAT_VERSION} file (make one with `lineinspect record`)"
                    raise RecordingError(msg)
                self.line_id = str(header.get("line_id"))
                for item in unpacker:
                    if not isinstance(item, dict) or not isinstance(item.get("payload"), bytes):
                        msg = f"{path}: damaged entry ({str(item)[:80]})"
                        raise RecordingError(msg)
                    yield str(item.get("kind")), item["payload"]
                self.unread_bytes = path.stat().st_size - unpacker.tell()
        except RecordingError:
            raise
        except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
            msg = f"{path}: not a readable recording ({error})"
            raise RecordingError(msg) from None


def _is_header(item: Any) -> bool:
    return isinstance(item, dict) and item.get("format") == FORMAT and item.get("version") == FORMAT_VERSION


def read_recording(path: Path) -> Recording:
    """Scan a recording in one pass (every entry checked, frames not kept); raises RecordingError naming the file
    when it is not one or an entry is damaged."""
    entries = _Entries(path)
    frame_count, decisions = 0, {}
    for position, (kind, payload) in enumerate(entries, start=1):
        try:
            if kind == "frame":
                decode_frame(payload)
                frame_count += 1
            elif kind == "decision":
                decision = decode_decision(payload)
                decisions[decision.frame_id] = decision
        except CodecError as error:
            msg = f"{path}: damaged entry {position} ({error})"
            raise RecordingError(msg) from None
    return Recording(path, entries.line_id, frame_count, decisions, entries.unread_bytes)


def record_line(
    client: StreamClient,
    keys: LineKeys,
    path: Path,
    stop: threading.Event,
    max_frames: int | None,
    settle_s: float = 5.0,
    started: threading.Event | None = None,
) -> tuple[int, int, int]:
    """Save new frames (and their decisions) of a line until ``max_frames`` or ``stop``; returns the counts of
    frames, decisions and skipped entries (not a frame or decision: the pipeline dead-letters those, the recording
    leaves them out and goes on).

    After the last frame, decisions are awaited up to ``settle_s`` so the recording has a baseline for each frame.
    ``started`` is set once the recorder has fixed its starting point: frames published after that are recorded.
    """
    writer = RecordingWriter(path, keys.line_id)
    positions = {keys.frames: client.last_id(keys.frames), keys.decisions: client.last_id(keys.decisions)}
    if started is not None:
        started.set()
    recorded = decided = skipped = 0
    awaiting: set[str] = set()  # recorded frames whose decision has not come yet: bounded by the line's backlog
    settle_until: float | None = None

    def frames_done() -> bool:
        return stop.is_set() or (max_frames is not None and recorded >= max_frames)

    try:
        while True:
            if frames_done() and settle_until is None:
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and (not awaiting or time.monotonic() > settle_until):
                break
            for stream, entry in client.tail(positions, count=100, block_ms=100):
                positions[stream] = entry.entry_id
                if entry.payload is None:
                    continue
                try:
                    if stream == keys.frames and not frames_done():
                        awaiting.add(decode_frame(entry.payload).frame_id)
                        writer.frame(entry.entry_id, entry.payload)
                        recorded += 1
                    elif stream == keys.decisions:
                        frame_id = decode_decision(entry.payload).frame_id
                        if frame_id in awaiting:
                            awaiting.discard(frame_id)
                            writer.decision(entry.payload)
                            decided += 1
                except CodecError as error:
                    skipped += 1
                    where = {"stream": stream, "entry_id": entry.entry_id, "error": str(error)}
                    logger.warning("entry skipped: not a frame or decision", extra=where)
    finally:
        writer.close()
    return recorded, decided, skipped


class ReplaySource:
    """Frames of a recording as a (non-live) ingest source, paced by ``speed``."""

    live = False

    def __init__(self, camera_id: str, path: Path, speed: float, run_id: str = "") -> None:
        if speed < 0:
            msg = f"replay speed must be >= 0 (0 = as fast as the pipeline takes), got {speed}"
            raise ValueError(msg)
        self.camera_id, self.speed, self.run_id = camera_id, speed, run_id
        self.recording = read_recording(path)

    def captures(self) -> Iterator[Capture]:
        first_ns, started = None, time.monotonic()
        for frame in self.recording.frames():
            first_ns = frame.captured_at_ns if first_ns is None else first_ns
            if self.speed > 0:
                due = started + (frame.captured_at_ns - first_ns) / 1e9 / self.speed
                time.sleep(max(0.0, due - time.monotonic()))
            metadata: dict[str, MetadataValue] = {**frame.metadata, "replay_of": frame.frame_id}
            if self.run_id:
                metadata["replay_run"] = self.run_id
            yield Capture(
                frame.data,
                frame.encoding,
                time.time_ns(),
                raw_shape=frame.raw_shape,
                raw_dtype=frame.raw_dtype,
                metadata=metadata,
                camera_id=frame.camera_id,
            )


CHANGED_FRAMES_SHOWN = 200  # frames listed in a report's changed_frames (all are counted)


def _distribution(scores: list[float]) -> dict[str, float | int]:
    if not scores:
        return {"count": 0}
    values = np.asarray(scores, dtype=np.float64)
    quantiles = np.quantile(values, [0.5, 0.9, 0.99])
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p50": float(quantiles[0]),
        "p90": float(quantiles[1]),
        "p99": float(quantiles[2]),
        "max": float(values.max()),
    }


def compare_decisions(baseline: dict[str, Decision], candidate: dict[str, Decision]) -> dict[str, Any]:
    """Report of verdict changes and score distributions; ``candidate`` is keyed by the recorded frame_id."""
    shared = sorted(set(baseline) & set(candidate))
    transitions: dict[str, int] = {}
    changed = []
    for frame_id in shared:
        before, after = baseline[frame_id].verdict, candidate[frame_id].verdict
        transitions[f"{before}->{after}"] = transitions.get(f"{before}->{after}", 0) + 1
        if before != after:
            changed.append(
                {
                    "frame_id": frame_id,
                    "baseline": before,
                    "candidate": after,
                    "baseline_score": baseline[frame_id].score,
                    "candidate_score": candidate[frame_id].score,
                }
            )
    by_label: dict[str, dict[str, int]] = {}
    for frame_id in shared:  # frames ingested with --metadata label=...: which flips are new false alarms or misses
        label = baseline[frame_id].metadata.get("label")
        if label is not None:
            key = f"{baseline[frame_id].verdict}->{candidate[frame_id].verdict}"
            counts = by_label.setdefault(str(label), {})
            counts[key] = counts.get(key, 0) + 1
    score_pairs = [(baseline[f].score, candidate[f].score) for f in shared]
    errors = Counter(d.error_reason or "unknown" for d in candidate.values() if d.verdict == "error")
    differences = [abs(b - c) for b, c in score_pairs if b is not None and c is not None]
    return {
        "frames_compared": len(shared),
        "missing_in_candidate": len(set(baseline) - set(candidate)),
        "missing_in_baseline": len(set(candidate) - set(baseline)),
        "verdict_changes": len(changed),
        "transitions": dict(sorted(transitions.items())),
        "transitions_by_label": {label: dict(sorted(counts.items())) for label, counts in sorted(by_label.items())},
        "changed_frames": changed[:CHANGED_FRAMES_SHOWN],
        "changed_frames_truncated": len(changed) > CHANGED_FRAMES_SHOWN,
        "baseline_models": sorted({d.model_id or "" for d in baseline.values()}),
        "candidate_models": sorted({d.model_id or "" for d in candidate.values()}),
        "baseline_thresholds": sorted({d.threshold for d in baseline.values() if d.threshold is not None}),
        "candidate_thresholds": sorted({d.threshold for d in candidate.values() if d.threshold is not None}),
        "candidate_errors": dict(sorted(errors.items())),
        "baseline_scores": _distribution([s for s, _ in score_pairs if s is not None]),
        "candidate_scores": _distribution([s for _, s in score_pairs if s is not None]),
        "mean_abs_score_change": float(np.mean(differences)) if differences else None,
    }
