"""How the thresholds behind a replay's two sides were set, and the warnings a go-live decision needs about them.

A verdict change between the live model and a candidate can come from the threshold rather than the model: a
threshold set from a few good images (a freshly fitted model's first threshold rests on 10% of its good images; with
fewer than about 20 of them it has none), or one chosen for another false-reject rate than the live one. The models'
manifests record how each threshold was set (``threshold``: value, method, false-reject rate, good images;
``models.artifact``); ``threshold_basis`` reads it for the model that made one side's decisions, and
``threshold_warnings`` says in plain words what makes the comparison misleading.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.threshold import FALSE_REJECT_RATE_METHOD, threshold_reliability  # numpy only: no torch


def threshold_basis(model_dir: str | None, decided_by: Sequence[str]) -> dict[str, Any] | None:
    """How the threshold of the model in ``model_dir`` was set: ``model_dir``, ``model_id`` and the manifest's
    ``threshold`` entry (``value``, ``method``, ``false_reject_rate``, ``good_images``; ``threshold`` None for a model
    without one), when the verified manifest is that of the one model in ``decided_by`` (the decisions' model ids,
    "" for errors without a model). None when that cannot be told: no directory, one that cannot be read here (it is
    verified as a worker verifies it), another model's, or decisions from several models."""
    from models.errors import ArtifactError
    from models.manifest import read_manifest  # not models.artifact: that imports torch and faiss (seconds)

    models = {model_id for model_id in decided_by if model_id}
    if model_dir is None or len(models) != 1:
        return None
    try:
        manifest = read_manifest(Path(model_dir))
    except (ArtifactError, OSError):
        return None
    if str(manifest.get("model_id")) not in models:
        return None
    threshold = manifest.get("threshold")
    basis: dict[str, Any] = {"model_dir": model_dir, "model_id": str(manifest["model_id"]), "threshold": None}
    if isinstance(threshold, dict):
        basis.update(threshold=threshold.get("value"), method=threshold.get("method"),
                     false_reject_rate=threshold.get("false_reject_rate"),
                     good_images=int(threshold.get("good_images") or 0))  # fmt: skip
    return basis


def _model(basis: Mapping[str, Any]) -> str:
    return f"(model {basis['model_id']}, {basis['model_dir']})"


def _weak(side: str, basis: Mapping[str, Any]) -> str | None:
    """What is weak about one side's threshold, or None."""
    model, model_dir = _model(basis), basis["model_dir"]
    calibrate = f"`lineinspect calibrate --model {model_dir} --good GOOD_IMAGES`"
    if basis["threshold"] is None:
        return (f"{side} {model} has no threshold (a model fitted on fewer than about 20 good images gets none): its "
                f"decisions are errors (uncalibrated), not verdicts; run {calibrate} on at least 200 good images it "
                "has not seen")  # fmt: skip
    if basis.get("method") != FALSE_REJECT_RATE_METHOD:
        return None  # set by hand: no image count to judge it by (the comparison of the two sides says so)
    images, rate = basis["good_images"], basis.get("false_reject_rate") or 0.0
    reliability = threshold_reliability(images, rate) if rate > 0 else ""
    if reliability:  # the words fit and calibrate print for that threshold
        return f"{side}'s threshold {model}: {reliability} Run {calibrate}"
    return None


def _how_set(basis: Mapping[str, Any]) -> str:
    method = basis.get("method")
    if method == FALSE_REJECT_RATE_METHOD:
        return f"for a false-reject rate of {basis.get('false_reject_rate') or 0.0:.2%}"
    return f"{'by hand' if method == 'manual' else f'by method {method}'} (at {basis['threshold']:.4g})"


def threshold_warnings(
    baseline: Mapping[str, Any] | None,
    candidate: Mapping[str, Any] | None,
    baseline_models: Sequence[str],
    candidate_errors: Mapping[str, int],
    recorded_line: str,
    recorded_line_model_dir: str | None,
) -> list[str]:
    """Warnings about the thresholds of the two sides (``threshold_basis`` of each, None when not known): a weak one
    on either side, two set for different false-reject rates or in different ways, the live model's unknown
    (``recorded_line``'s model key, ``recorded_line_model_dir``, no longer names the model that decided the
    recording, ``baseline_models``), and candidate decisions that are errors because it has no threshold."""
    warnings = [w for w in (_weak("the candidate", candidate) if candidate else None,
                            _weak("the live model", baseline) if baseline else None) if w]  # fmt: skip
    uncalibrated = candidate_errors.get("uncalibrated", 0)
    if uncalibrated and not (candidate and candidate["threshold"] is None):
        warnings.append(f"{uncalibrated} candidate decisions are errors (uncalibrated): the model that made them has "
                        "no threshold; run `lineinspect calibrate` on it")  # fmt: skip
    if candidate is None or candidate["threshold"] is None:
        return warnings
    live = [model_id for model_id in baseline_models if model_id]
    if baseline is None:
        if len(live) == 1:  # several: the model warnings say the baseline mixes them
            names = (f"names {recorded_line_model_dir}, which is not that model or cannot be read here"
                     if recorded_line_model_dir else "is not set")  # fmt: skip
            warnings.append(f"how the live model's threshold was set is not known: line {recorded_line}'s model key "
                            f"{names} (the recording was decided by model {live[0]}), so the two thresholds' "
                            f"false-reject rates and good images were not compared")  # fmt: skip
        return warnings
    if baseline["threshold"] is None:
        return warnings
    if baseline.get("method") != candidate.get("method"):
        differ = True
    elif candidate.get("method") == FALSE_REJECT_RATE_METHOD:
        differ = not math.isclose(baseline.get("false_reject_rate") or 0.0, candidate.get("false_reject_rate") or 0.0)
    else:
        differ = False  # both set by hand: no rate to compare
    if differ:
        warnings.append(f"the candidate's threshold was set {_how_set(candidate)}, the live model's "
                        f"{_how_set(baseline)}: verdict changes come from that choice as much as from the models; "
                        "calibrate the candidate as the live model was (`lineinspect calibrate --model "
                        f"{candidate['model_dir']} --good GOOD_IMAGES --false-reject-rate RATE`) before comparing "
                        "verdicts")  # fmt: skip
    return warnings
