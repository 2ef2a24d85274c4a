"""Small recordings for the record/replay tests: frames of a few bytes (their pixels are never decoded) and files
written in the current format or by hand in the old one (version 1)."""

from __future__ import annotations

from pathlib import Path

import msgpack

from pipeline.codec import encode_decision, encode_frame
from pipeline.messages import Decision, Frame, MetadataValue
from workers.record import RecordingWriter


def tiny_frame(frame_id: str, sequence: int = 0, captured_at_ns: int = 1_000_000_000, line_id: str = "line-1") -> Frame:
    return Frame(line_id=line_id, camera_id="cam0", frame_id=frame_id, sequence=sequence,
                 captured_at_ns=captured_at_ns, encoding="png", data=b"not decoded " * 4)  # fmt: skip


def decision_for(
    frame_id: str,
    verdict: str = "pass",
    score: float | None = 1.0,
    *,
    frame_entry_id: str | None = None,
    model_id: str = "m",
    metadata: dict[str, MetadataValue] | None = None,
    threshold: float | None = None,
) -> Decision:
    return Decision.model_validate(
        {
            "frame_id": frame_id,
            "line_id": "line-1",
            "camera_id": "cam0",
            "verdict": verdict,
            "score": score,
            "threshold": threshold,
            "model_id": model_id,
            "error_reason": "stale" if verdict == "error" else None,
            "captured_at_ns": 1,
            "frame_entry_id": frame_entry_id,
            "metadata": metadata or {},
        }
    )


def write_recording(path: Path, frames: list[Frame], scores: list[float] | None = None) -> Path:
    """Frame n at stream entry ``n-0`` followed by its decision (score ``scores[n - 1]``, default n)."""
    with RecordingWriter(path, "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            score = float(number) if scores is None else scores[number - 1]
            writer.frame(f"{number}-0", encode_frame(frame))
            writer.decision(f"{number}-0", encode_decision(decision_for(frame.frame_id, score=score)))
    return path


def write_v1_recording(path: Path, entries: list[tuple[str, Frame | Decision]]) -> Path:
    """A recording as the version 1 recorder wrote it: no checksums, no end record, decisions without an entry id."""
    items: list[dict[str, object]] = [{"format": "lineinspect-recording", "version": 1, "line_id": "line-1",
                                       "created_at_ns": 1}]  # fmt: skip
    for entry_id, message in entries:
        if isinstance(message, Frame):
            items.append({"kind": "frame", "entry_id": entry_id, "payload": encode_frame(message)})
        else:
            items.append({"kind": "decision", "payload": encode_decision(message)})
    path.write_bytes(b"".join(msgpack.packb(item, use_bin_type=True) for item in items))
    return path
