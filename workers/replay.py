"""``lineinspect replay``: push a recording through a line, collect the decisions, compare with the recording's.

To try a candidate model on yesterday's production: run a scoring worker with the candidate on a shadow line
(``lineinspect score-worker --line shadow --model CANDIDATE`` plus a sink), then
``lineinspect replay FILE --line shadow --report report.json``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from pipeline.codec import decode_decision
from pipeline.messages import Decision
from pipeline.streams import LineKeys
from workers.ingest import Ingestor
from workers.lifecycle import WorkerRuntime
from workers.record import RecordingError, ReplaySource, compare_decisions


def replay_and_compare(
    runtime: WorkerRuntime, path: Path, line_id: str | None, speed: float, run_id: str, timeout_s: float
) -> dict[str, Any]:
    """Replay ``path`` onto ``line_id`` (default: the recorded line) and return the comparison report."""
    source = ReplaySource("replay", path, speed, run_id=run_id)
    line_id = line_id or source.recording.line_id
    if line_id == source.recording.line_id:
        msg = (f"{path} was recorded on line {line_id}: replaying onto it would put old frames among that line's "
               "decisions; replay onto a shadow line (--line) whose workers run the candidate model")  # fmt: skip
        raise RecordingError(msg)
    keys = LineKeys(runtime.config.streams.prefix, line_id)
    client = runtime.client
    position = client.last_id(keys.decisions)
    ingestor = Ingestor(runtime, line_id, [source], max_frames=None)
    sender = threading.Thread(target=ingestor.run, name="replay-ingest", daemon=True)
    sender.start()
    expected = source.recording.frame_count
    candidate: dict[str, Decision] = {}
    deadline = None  # the timeout counts from the last frame sent: a long recording at speed 1 takes its time
    while len(candidate) < expected and (deadline is None or time.monotonic() < deadline):
        if deadline is None and not sender.is_alive():
            deadline = time.monotonic() + timeout_s
        for _stream, entry in client.tail({keys.decisions: position}, count=200, block_ms=200):
            position = entry.entry_id
            if entry.payload is None:
                continue
            decision = decode_decision(entry.payload)
            if decision.metadata.get("replay_run") == run_id:
                candidate[str(decision.metadata["replay_of"])] = decision
        if runtime.stop.is_set() and not sender.is_alive():
            break
    runtime.stop.set()
    sender.join(timeout=10)
    report = compare_decisions(source.recording.decisions, candidate)
    warnings = []
    if source.recording.truncated_bytes:
        warnings.append(f"{path} ends in {source.recording.truncated_bytes} bytes that are not a whole entry: the "
                        "recording was cut (a recorder stopped mid-write, a partial copy); the rest was used")
    if not candidate and expected:
        warnings.append(f"no decision came back from line {line_id} within {timeout_s:.0f} s of the last frame: "
                        "is a scoring worker and a sink running for it? (its frames stay on its stream)")  # fmt: skip
    elif len(candidate) < expected:
        warnings.append(f"{expected - len(candidate)} of {expected} frames got no decision within {timeout_s:.0f} s "
                        "of the last frame sent (--timeout-s)")  # fmt: skip
    report.update(
        {
            "recording": str(path),
            "line_id": line_id,
            "frames_replayed": ingestor.published,
            "decisions_received": len(candidate),
            "timed_out": len(candidate) < expected,
            "recording_truncated": bool(source.recording.truncated_bytes),
            "warnings": warnings,
        }
    )
    return report
