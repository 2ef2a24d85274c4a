"""Small recordings for the record/replay tests: frames of a few bytes (their pixels are never decoded) and files
written in the current format or in the old ones (version 2 without gap records, version 1 by hand)."""

from __future__ import annotations

from pathlib import Path

import msgpack

from pipeline.codec import encode_decision, encode_frame
from pipeline.messages import Decision, Frame, MetadataValue
from workers.record import FORMAT, HEADER_FIELDS, RecordingWriter, _crc


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


def write_recording(
    path: Path, frames: list[Frame], scores: list[float] | None = None, entry_ids: list[str] | None = None
) -> Path:
    """Frame n at stream entry ``entry_ids[n - 1]`` (default ``n-0``) followed by its decision (score
    ``scores[n - 1]``, default n)."""
    with RecordingWriter(path, "line-1") as writer:
        for number, frame in enumerate(frames, start=1):
            score = float(number) if scores is None else scores[number - 1]
            entry_id = f"{number}-0" if entry_ids is None else entry_ids[number - 1]
            writer.frame(entry_id, encode_frame(frame))
            writer.decision(entry_id, encode_decision(decision_for(frame.frame_id, score=score)))
    return path


def stream_ids(frames: list[Frame]) -> list[str]:
    """Entry ids as Redis gives them for frames published as they were captured: ``<ms>-<sequence>``."""
    return [f"{frame.captured_at_ns // 1_000_000}-{number}" for number, frame in enumerate(frames)]


def as_version_2(path: Path) -> Path:
    """Rewrite the header of a recording without gap records as the version 2 recorder wrote it (version 2 is
    version 3 without gap records: the entries and the end record are the same)."""
    unpacker = msgpack.Unpacker(raw=False)
    data = path.read_bytes()
    unpacker.feed(data)
    header = next(unpacker)
    rest = data[unpacker.tell() :]
    values = [FORMAT, 2, header["line_id"], header["created_at_ns"]]
    path.write_bytes(msgpack.packb({**dict(zip(HEADER_FIELDS, values, strict=True)), "crc32": _crc(values)}) + rest)
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
