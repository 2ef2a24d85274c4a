"""``lineinspect replay``: push a recording through a line, collect the decisions, compare with the recording's.

To try a candidate model on yesterday's production: put the candidate on a shadow line (``lineinspect promote
--line shadow --model CANDIDATE``: a score-worker's ``--model`` counts only on a line whose model key is unset), run a
scoring worker and a sink there (``--line shadow``), then ``lineinspect replay FILE --line shadow --report
report.json``.

Each recorded frame is compared on its own, by its number in the recording (sent as ``metadata["replay_frame"]``
and carried into its decision): cameras reuse frame ids, so two recorded frames may share one. The report shows the
frame id and the recorded stream entry id beside the number.

Two models' raw scores are on scales of their own: the report sets each against the threshold it was decided with
(``score_ratio``: above 1 fails), says how each side did on frames whose ``label`` metadata gives their truth
(``accuracy``), and how each side's threshold was set and whether that makes the comparison misleading
(``workers.replay_thresholds``: the live model's as the recorded line's model key names it now, when that is the
model that decided the recording).

The recording is read and verified whole (``ReplaySource``) and the target line checked (``shadow_line``) before
the replay's worker runtime starts: a file that cannot be replayed is refused before anything touches Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.codec import CodecError, decode_decision
from pipeline.messages import Decision
from pipeline.streams import LineKeys
from workers.ingest import Ingestor
from workers.lifecycle import WorkerRuntime
from workers.record import (
    CHECKSUMMED_VERSION,
    DecisionSummary,
    Gap,
    Recording,
    RecordingError,
    ReplaySource,
    summarise,
)
from workers.replay_thresholds import threshold_basis, threshold_warnings
from workers.score import manifest_model_id
from workers.sources import GOOD_LABEL

logger = logging.getLogger(__name__)
CHANGED_FRAMES_SHOWN = 200  # frames listed in a report's changed_frames (all are counted)
GAPS_SHOWN = 200  # gaps listed in a report's recording_gaps (all are counted)
GAPS_IN_WARNING = 3


def shadow_line(recording: Recording, line_id: str | None) -> str:
    """The line to replay ``recording`` onto: ``line_id``, never the line it was recorded on (RecordingError)."""
    line_id = line_id or recording.line_id
    if line_id == recording.line_id:
        msg = (f"{recording.path} was recorded on line {line_id}: replaying onto it would put old frames among "
               "that line's decisions; replay onto a shadow line (--line) whose workers run the candidate "
               "model")  # fmt: skip
        raise RecordingError(msg)
    return line_id


def replay_and_compare(
    runtime: WorkerRuntime, source: ReplaySource, line_id: str | None, timeout_s: float
) -> dict[str, Any]:
    """Replay ``source`` (a recording read and verified before ``runtime`` started) onto ``line_id`` (never the
    recorded line) and return the comparison report."""
    recording, run_id, path = source.recording, source.run_id, source.recording.path
    line_id = shadow_line(recording, line_id)
    keys = LineKeys(runtime.config.streams.prefix, line_id)
    client = runtime.client
    position = client.last_id(keys.decisions)
    ingestor = Ingestor(runtime, line_id, [source], max_frames=None)
    sender = threading.Thread(target=ingestor.run, name="replay-ingest", daemon=True)
    sender.start()
    expected = recording.frame_count
    candidate: dict[int, DecisionSummary] = {}  # by frame number in the recording
    duplicates = 0
    stopped = stalled = False
    progress, last_progress = (0, 0), time.monotonic()  # (frames sent, decisions received), when either last grew
    deadline = None  # the timeout counts from the last frame sent: a long recording at speed 1 takes its time
    while len(candidate) < expected and (deadline is None or time.monotonic() < deadline):
        if deadline is None and not sender.is_alive():
            deadline = time.monotonic() + timeout_s
        for _stream, entry in client.tail({keys.decisions: position}, count=200, block_ms=200):
            position = entry.entry_id
            replayed = _replayed_frame(entry.payload, run_id, expected)
            if replayed is None:
                continue
            number, decision = replayed
            if number in candidate:
                duplicates += 1
            else:
                candidate[number] = summarise(decision)
        if runtime.stop.is_set() and not sender.is_alive():
            stopped = True  # Ctrl-C / SIGTERM: report what came back
            break
        now = time.monotonic()
        if (ingestor.published, len(candidate)) != progress:
            progress, last_progress = (ingestor.published, len(candidate)), now
        elif sender.is_alive() and now - max(last_progress, source.paced_until) > timeout_s:
            stalled = True  # the line takes no more frames (its scorers' backlog is full) and gives no decisions
            break
    runtime.stop.set()
    sender.join(timeout=10)
    report = compare_decisions(recording.decisions, candidate, recording.entry_ids)
    line_model_dir = client.get_model_dir(keys)  # what the shadow line's scorers load, whatever their --model said
    line_model_id = manifest_model_id(Path(line_model_dir)) if line_model_dir else None  # None: not readable here
    live_model_dir = client.get_model_dir(LineKeys(keys.prefix, recording.line_id))  # now; checked against the ids
    baseline_basis = threshold_basis(live_model_dir, report["baseline_models"])
    candidate_basis = threshold_basis(line_model_dir, report["candidate_models"])
    report.update(
        {
            "recording": str(path),
            "recording_version": recording.version,
            "recording_complete": recording.complete,
            "recording_truncated": recording.cut,
            "recording_frames": expected,
            "recording_frames_without_decision": expected - len(recording.decisions),
            "recording_unmatched_decisions": recording.unmatched_decisions,
            "frames_missing_from_recording": recording.missing_frames,
            "recording_gaps": [gap_report(gap) for gap in recording.gaps[:GAPS_SHOWN]],
            "recording_gaps_truncated": len(recording.gaps) > GAPS_SHOWN,
            "frames_reusing_an_id": recording.reused_frame_ids,
            "line_id": line_id,
            "candidate_line_model_dir": line_model_dir,
            "baseline_threshold_basis": baseline_basis,
            "candidate_threshold_basis": candidate_basis,
            "frames_replayed": ingestor.published,
            "decisions_received": len(candidate),
            "duplicate_decisions": duplicates,
            "timed_out": len(candidate) < expected and not stopped,
            "stopped": stopped,
            "warnings": _warnings(
                path,
                recording,
                source,
                ingestor.published,
                len(candidate),
                stopped,
                stalled,
                line_id,
                timeout_s,
                ingestor.not_sent,
            )
            + _model_warnings(
                report["baseline_models"], report["candidate_models"], line_id, line_model_dir, line_model_id
            )
            + threshold_warnings(
                baseline_basis,
                candidate_basis,
                report["baseline_models"],
                report["candidate_errors"],
                recording.line_id,
                live_model_dir,
            ),
        }
    )
    return report


def _model_warnings(
    baseline_models: Sequence[str],
    candidate_models: Sequence[str],
    line_id: str,
    line_model_dir: str | None,
    line_model_id: str | None = None,
) -> list[str]:
    """Warnings about which models the comparison is between: the live model against itself (the shadow line's model
    key names another model than the engineer meant: a score-worker's --model counts only on a line without one),
    a key naming a model (``line_model_id``, None when its manifest cannot be read here) that made none of the
    candidate decisions, or several models on either side."""
    baseline, candidate = [m for m in baseline_models if m], [m for m in candidate_models if m]
    warnings = []
    if line_model_id is not None and candidate and line_model_id not in candidate:
        warnings.append(f"line {line_id}'s model key names {line_model_dir} (model {line_model_id}), but its "
                        f"decisions came from {', '.join(candidate)}: its scorers did not load that model (see their "
                        "log), had not swapped to it yet, or it was promoted after the replay; the candidate figures "
                        "are not that model's")  # fmt: skip
    for model_id in sorted(set(baseline) & set(candidate)):
        warnings.append(f"line {line_id} scored with model {model_id}, which also decided the recording: this "
                        f"compares the live model with itself. The line's model key names {line_model_dir}; to "
                        f"score the candidate there, run `lineinspect promote --line {line_id} --model CANDIDATE` (a "
                        "score-worker's --model is used only on a line that names no model yet)")  # fmt: skip
    if len(candidate) > 1:
        warnings.append(f"line {line_id} scored with {len(candidate)} models ({', '.join(candidate)}): its model "
                        "changed during the replay, so the candidate's figures mix them")  # fmt: skip
    if len(baseline) > 1:
        warnings.append(f"the recording was decided by {len(baseline)} models ({', '.join(baseline)}; the line's "
                        "model changed while it was recorded), so the baseline's figures mix them; each changed "
                        "frame gives the threshold it was decided with")  # fmt: skip
    return warnings


def gap_report(gap: Gap) -> dict[str, Any]:
    """A recording's gap as the report lists it."""
    return {"after_frame": gap.after_frame, "frames": gap.frames, "after_entry_id": gap.after_entry_id,
            "before_entry_id": gap.before_entry_id or None}  # fmt: skip


def _replayed_frame(payload: bytes | None, run_id: str, frame_count: int) -> tuple[int, Decision] | None:
    """A decision on the replay line and the recording's frame number it is for; None when not one of this run's."""
    if payload is None:
        return None
    try:
        decision = decode_decision(payload)
    except CodecError:
        return None
    metadata = decision.metadata
    number = metadata.get("replay_frame")
    if metadata.get("replay_run") != run_id:
        return None
    if type(number) is not int or not 1 <= number <= frame_count:
        logger.warning("decision of this replay without a frame number, ignored", extra={"replay_frame": number})
        return None
    return number, decision


def _warnings(
    path: Path,
    recording: Recording,
    source: ReplaySource,
    sent: int,
    received: int,
    stopped: bool,
    stalled: bool,
    line_id: str,
    timeout_s: float,
    not_sent: Mapping[str, int],
) -> list[str]:
    """What an engineer must know before trusting the report, in plain words (``not_sent``: frames the replay's
    ingest could not send, by reason)."""
    warnings = []
    expected = recording.frame_count
    if source.failure is not None:
        warnings.append(f"the replay stopped reading the recording: {source.failure}")
    if recording.cut:
        unfinished = recording.truncated_bytes
        partial = f", then {unfinished} bytes of an unfinished entry" if unfinished else ""
        warnings.append(f"{path} was cut: it ends without the end record the recorder writes when it stops{partial} "
                        "(the recorder was killed, the disk filled, the copy is partial, or it is still recording); "
                        f"its {expected} whole frames are intact and were used")  # fmt: skip
    if recording.version < CHECKSUMMED_VERSION:
        warnings.append(f"{path} is a version 1 recording: it has no checksums, so damage inside it cannot be seen")
    if recording.gaps:
        gaps = recording.gaps
        shown = "; ".join(f"{gap.frames} after frame {gap.after_frame} (stream entries {gap.after_entry_id} to "
                          f"{gap.before_entry_id or 'the end'})" for gap in gaps[:GAPS_IN_WARNING])  # fmt: skip
        more = f"; {len(gaps) - GAPS_IN_WARNING} more gaps in recording_gaps" if len(gaps) > GAPS_IN_WARNING else ""
        warnings.append(f"{path} misses {recording.missing_frames} frames the line saw, trimmed from its stream before "
                        f"the recorder read them (it fell more than streams.maxlen frames behind): {shown}{more}; "
                        "they were neither replayed nor compared")  # fmt: skip
    undecided = expected - len(recording.decisions)
    if undecided:
        warnings.append(f"{undecided} of {expected} recorded frames have no recorded decision (the recorder "
                        "stopped before they were decided, or their decisions were lost): replayed, not "
                        "compared")  # fmt: skip
    unmatched = recording.unmatched_decisions
    if unmatched:
        warnings.append(f"{path} holds {unmatched} decision{'s' if unmatched > 1 else ''} for no recorded frame (a "
                        "second decision for a frame, or one for a frame not recorded): left out of the "
                        "baseline")  # fmt: skip
    if expected == 0:
        warnings.append(f"{path} holds no frames: nothing was replayed or compared")
        return warnings
    if stopped:
        warnings.append(f"the replay was stopped (Ctrl-C or SIGTERM) after sending {sent} of {expected} frames")
    elif sent < expected and source.failure is None:
        too_large, invalid = not_sent.get("too_large", 0), not_sent.get("invalid", 0)
        why = [f"{too_large} larger than streams.max_frame_bytes"] if too_large else []
        if invalid:
            why.append(f"{invalid} that no frame may carry (a camera id too long for a frame id made from "
                       "it, or metadata over 256 entries or 64 KiB with the replay's own keys: replay_of, "
                       "replay_frame, replay_run)")  # fmt: skip
        warnings.append(f"{expected - sent} of {expected} frames were not sent ({'; '.join(why) or 'see the log'}; "
                        "the log says why for each)")  # fmt: skip
    if stalled:
        warnings.append(f"line {line_id} took no frame and gave no decision for {timeout_s:.0f} s, {sent} of "
                        f"{expected} frames sent: its scorers' backlog is full (ingest.live_queue_limit); is a scoring "
                        "worker and a sink running for it? (its frames stay on its stream)")  # fmt: skip
    elif received == 0 and not stopped:
        warnings.append(f"no decision came back from line {line_id} within {timeout_s:.0f} s of the last frame: "
                        "is a scoring worker and a sink running for it? (its frames stay on its stream)")  # fmt: skip
    elif received < sent and not stopped:
        warnings.append(f"{sent - received} of {sent} frames sent got no decision within {timeout_s:.0f} s of the "
                        "last frame sent (--timeout-s)")  # fmt: skip
    return warnings


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


def score_ratio(decision: DecisionSummary) -> float | None:
    """The decision's score over the threshold it was decided with (above 1 fails), as
    ``lineinspect_score_threshold_ratio`` measures it: two models' raw scores are on scales of their own, their ratios
    on one. None without a score or with a threshold that is not positive (a ratio would not order the scores)."""
    if decision.score is None or decision.threshold is None or not decision.threshold > 0:
        return None
    return decision.score / decision.threshold


def _accuracy(decided: Sequence[tuple[str | None, DecisionSummary]]) -> dict[str, Any]:
    """How one side decided the frames with a label (``(label, decision)``): label ``good`` is a good part, any other
    names a defect (as a dataset's test folders do). Rates are None without such frames; errors count in neither."""
    good = [d.verdict for label, d in decided if label == GOOD_LABEL]
    defective = [d.verdict for label, d in decided if label is not None and label != GOOD_LABEL]
    rejected, caught = good.count("fail"), defective.count("fail")
    decided_good, decided_defective = rejected + good.count("pass"), caught + defective.count("pass")
    return {
        "good_frames": len(good),
        "good_rejected": rejected,
        "good_errors": good.count("error"),
        "false_reject_rate": rejected / decided_good if decided_good else None,
        "defective_frames": len(defective),
        "defective_caught": caught,
        "defective_errors": defective.count("error"),
        "catch_rate": caught / decided_defective if decided_defective else None,
    }


def compare_decisions(
    baseline: Mapping[int, DecisionSummary], candidate: Mapping[int, DecisionSummary], entry_ids: Sequence[str] = ()
) -> dict[str, Any]:
    """Report of verdict changes and score distributions. Both sides are keyed by the frame's number in the
    recording (1 = first), never by frame_id, which several recorded frames may share; ``entry_ids[number - 1]``,
    when given, is the frame's recorded stream entry id, shown with its frame_id for each changed frame."""
    shared = sorted(set(baseline) & set(candidate))
    transitions: Counter[str] = Counter()
    by_label: dict[str, Counter[str]] = {}
    changed = []
    for number in shared:
        before, after = baseline[number], candidate[number]
        transition = f"{before.verdict}->{after.verdict}"
        transitions[transition] += 1
        if before.label is not None:  # frames ingested with --metadata label=...: new false alarms, misses
            by_label.setdefault(before.label, Counter())[transition] += 1
        if before.verdict != after.verdict:
            changed.append(
                {
                    "frame": number,
                    "frame_id": before.frame_id,
                    "entry_id": entry_ids[number - 1] if number <= len(entry_ids) else None,
                    "baseline": before.verdict,
                    "candidate": after.verdict,
                    "baseline_score": before.score,
                    "candidate_score": after.score,
                    # why: the threshold each side applied to this frame (a line promoted while it was recorded
                    # has several), its label, an error's reason, and the overlay of the side that failed it
                    "label": before.label,
                    "baseline_threshold": before.threshold,
                    "candidate_threshold": after.threshold,
                    "baseline_error_reason": before.error_reason,
                    "candidate_error_reason": after.error_reason,
                    "baseline_heatmap": before.heatmap_ref,
                    "candidate_heatmap": after.heatmap_ref,
                    # the two scores on one scale: each over its own threshold, above 1 fails
                    "baseline_score_ratio": score_ratio(before),
                    "candidate_score_ratio": score_ratio(after),
                }
            )
    score_pairs = [(baseline[number].score, candidate[number].score) for number in shared]
    ratio_pairs = [(score_ratio(baseline[number]), score_ratio(candidate[number])) for number in shared]
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
        "baseline_score_ratios": _distribution([r for r, _ in ratio_pairs if r is not None]),
        "candidate_score_ratios": _distribution([r for _, r in ratio_pairs if r is not None]),
        "accuracy": {  # by the recorded label of the frames both sides decided
            side: _accuracy([(baseline[number].label, decided[number]) for number in shared])
            for side, decided in (("baseline", baseline), ("candidate", candidate))
        },
    }
