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
from workers.record import ReplaySource, compare_decisions


def replay_and_compare(
    runtime: WorkerRuntime, path: Path, line_id: str | None, speed: float, run_id: str, timeout_s: float
) -> dict[str, Any]:
    """Replay ``path`` onto ``line_id`` (default: the recorded line) and return the comparison report."""
    source = ReplaySource("replay", path, speed, run_id=run_id)
    line_id = line_id or source.recording.line_id
    keys = LineKeys(runtime.config.streams.prefix, line_id)
    client = runtime.client
    position = client.last_id(keys.decisions)
    ingestor = Ingestor(runtime, line_id, [source], max_frames=None)
    sender = threading.Thread(target=ingestor.run, name="replay-ingest", daemon=True)
    sender.start()
    expected = len(source.recording.frames)
    candidate: dict[str, Decision] = {}
    deadline = time.monotonic() + timeout_s
    while len(candidate) < expected and time.monotonic() < deadline:
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
    report.update(
        {
            "recording": str(path),
            "line_id": line_id,
            "frames_replayed": ingestor.published,
            "decisions_received": len(candidate),
            "timed_out": len(candidate) < expected,
        }
    )
    return report
