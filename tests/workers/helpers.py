"""Small helpers for worker tests: frames from files, polling a condition, threads that run a worker loop."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.codec import decode_decision, encode_frame
from pipeline.messages import Decision, Frame
from pipeline.streams import LineKeys, StreamClient


def frame_from_file(path: Path, line_id: str = "line-1", **overrides: object) -> Frame:
    fields: dict[str, object] = {
        "line_id": line_id,
        "camera_id": "cam0",
        "frame_id": f"{path.stem}-{uuid.uuid4().hex[:8]}",
        "sequence": 0,
        "captured_at_ns": time.time_ns(),
        "encoding": "png" if path.suffix == ".png" else "jpeg",
        "data": path.read_bytes(),
        "metadata": {"source_file": path.name},
    }
    fields.update(overrides)
    return Frame.model_validate(fields)


def publish_frames(client: StreamClient, keys: LineKeys, frames: list[Frame]) -> list[str]:
    return [client.publish(keys.frames, encode_frame(frame)) for frame in frames]


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail the test (not a timing assertion, a hang guard) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout_s} s waiting for {what}"
            raise AssertionError(msg)
        time.sleep(0.05)


def decisions_in(client: StreamClient, stream: str) -> list[Decision]:
    return [decode_decision(entry.payload) for entry in client.read_range(stream, "0-0", 100_000) if entry.payload]


def start_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread
