"""Pass/fail thresholds from good images alone, and the best-F1 threshold when defects are known.

Factories rarely have defect samples, so the primary threshold is a quantile of held-out **good** scores at a
target false-reject rate. With zero defect images this still gives a usable threshold: it never degenerates to
"flag everything" (anomalib's adaptive F1 threshold does, since F1 has no positives to balance).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where it is built: judging a threshold (lineinspect replay) needs no torch
    from models.scorer import Threshold

FALSE_REJECT_RATE_METHOD = "false_reject_rate"  # Threshold.method of a threshold set from good images' scores
MIN_GOOD_IMAGES = 2  # one score has no spread for a margin: its threshold would fail half of all good parts
RELIABLE_GOOD_IMAGES = 20  # fewer: thresholds rejected 1-50% of other good images on validation (RESULTS.md 7)
# Share of other good parts that thresholds set from k good images (their largest score plus one inter-quartile
# range) rejected on MTD's validation split: the mean over 13 models of 2,000 draws each (RESULTS.md section 7)
VALIDATION_REJECTS = {2: 0.231, 3: 0.129, 5: 0.066, 10: 0.021, 20: 0.007, 50: 0.003}


class ThresholdWarning(UserWarning):
    """A threshold set from too few good images to measure its rate (the text of ``threshold_reliability``)."""


def false_reject_threshold(good_scores: np.ndarray, false_reject_rate: float) -> Threshold:
    """Smallest threshold that rejects at most ``false_reject_rate`` of ``good_scores``.

    With fewer than ``1 / false_reject_rate`` good images the rate cannot be resolved: the threshold is then the
    largest good score plus a margin of one inter-quartile range, and a warning says how far it can be trusted
    (``threshold_reliability``). At least ``MIN_GOOD_IMAGES`` are needed.
    """
    if not 0 < false_reject_rate < 1:
        msg = f"false_reject_rate must be in (0, 1), got {false_reject_rate}"
        raise ValueError(msg)
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    finite = np.isfinite(scores)
    if not finite.all():  # np.sort puts NaN last: a NaN threshold would pass every part (score > NaN is False)
        msg = (f"{int((~finite).sum())} of {scores.size} good scores are not finite (NaN or infinite): the scorer "
               "failed on those images; find out why before setting a threshold from them")  # fmt: skip
        raise ValueError(msg)
    if scores.size < MIN_GOOD_IMAGES:
        msg = (f"a threshold needs at least {MIN_GOOD_IMAGES} good images, got {scores.size}: one image's score "
               f"has no spread to set a margin from, and a threshold at it fails about half of all good parts "
               f"(use at least {RELIABLE_GOOD_IMAGES} good images the model has not seen)")  # fmt: skip
        raise ValueError(msg)
    from models.scorer import Threshold

    allowed_rejects = _allowed_rejects(scores.size, false_reject_rate)
    if allowed_rejects == 0:
        spread = float(np.subtract(*np.percentile(scores, [75, 25])))  # at least MIN_GOOD_IMAGES scores
        value = float(scores[-1] + max(spread, 1e-6 * abs(scores[-1]), 1e-9))
        warnings.warn(f"threshold {value:.4f}: {threshold_reliability(scores.size, false_reject_rate)}",
                      ThresholdWarning, stacklevel=2)  # fmt: skip
    else:
        # Everything strictly above the threshold fails; put it at the score that leaves allowed_rejects above it.
        value = float(scores[scores.size - allowed_rejects - 1])
    return Threshold(value=value, method=FALSE_REJECT_RATE_METHOD, false_reject_rate=false_reject_rate,
                     good_images=int(scores.size))  # fmt: skip


def _allowed_rejects(good_images: int, false_reject_rate: float) -> int:
    # rounded first: a decimal rate times a count is often just below the integer it stands for in binary floats
    # (0.009 x 3000 = 26.999999999999996 would allow 26 rejects, not 27)
    return math.floor(round(false_reject_rate * good_images, 6))


def threshold_reliability(good_images: int, false_reject_rate: float) -> str:
    """How far a threshold that ``false_reject_threshold`` set from ``good_images`` scores can be trusted and what
    to do about it, in words for the user; "" when the images measure the rate. Below ``RELIABLE_GOOD_IMAGES`` it
    gives the share of good parts such thresholds rejected on validation (``VALIDATION_REJECTS``)."""
    if _allowed_rejects(good_images, false_reject_rate) > 0:
        return ""
    needed = math.ceil(round(1 / false_reject_rate, 6))
    text = (f"{good_images} good images cannot resolve a false-reject rate of {false_reject_rate:.2%} ({needed} "
            "can): the threshold is set just above their largest score.")  # fmt: skip
    if good_images >= RELIABLE_GOOD_IMAGES:
        return (f"{text} On validation such thresholds rejected 0.7% of other good parts from 20 good images and "
                f"0.3% from 50 (benchmarks/RESULTS.md section 7); for the rate itself calibrate on {needed} or more "
                "good images the model has not seen.")  # fmt: skip
    measured = sorted(VALIDATION_REJECTS)
    below = max((count for count in measured if count <= good_images), default=measured[0])
    above = min(count for count in measured if count >= good_images)
    rejected = f"{VALIDATION_REJECTS[below]:.1%} of other good parts when set from {below} good images"
    if above != below:
        rejected += f" and {VALIDATION_REJECTS[above]:.1%} from {above}"
    return (f"{text} From fewer than {RELIABLE_GOOD_IMAGES} good images such a threshold is unreliable: on "
            f"validation such thresholds rejected {rejected} (benchmarks/RESULTS.md section 7). Before trusting its "
            f"verdicts, calibrate on at least {good_images_to_calibrate_on(false_reject_rate)} good images the model "
            "has not seen.")  # fmt: skip


def good_images_to_calibrate_on(false_reject_rate: float) -> str:
    """How many good images to calibrate on, in words: "20, better 200," (``RELIABLE_GOOD_IMAGES``, and as many as
    resolve the rate when that is more), or "20" for a rate that fewer resolve (10%: 10)."""
    needed = math.ceil(round(1 / false_reject_rate, 6))
    return f"{RELIABLE_GOOD_IMAGES}, better {needed}," if needed > RELIABLE_GOOD_IMAGES else str(RELIABLE_GOOD_IMAGES)


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 with "fail" = score > threshold; needs at least one defect."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not labels.any():
        msg = "best-F1 threshold needs at least one defective image"
        raise ValueError(msg)
    if np.isnan(scores).any():  # argsort puts NaN last: it would rank as the least anomalous, silently
        msg = f"best-F1 threshold of scores with {int(np.isnan(scores).sum())} NaN among {scores.size}"
        raise ValueError(msg)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    true_positives = np.cumsum(sorted_labels)
    predicted = np.arange(1, scores.size + 1)
    f1 = 2 * true_positives / (predicted + labels.sum())
    # Only cut between distinct scores.
    valid = np.r_[sorted_scores[1:] < sorted_scores[:-1], True]
    best = int(np.argmax(np.where(valid, f1, -1)))
    lowest_failing = sorted_scores[best]
    below = sorted_scores[best + 1] if best + 1 < scores.size else lowest_failing - 1.0
    middle = (lowest_failing + below) / 2
    # between adjacent floats (or next to an infinity) the midpoint rounds onto an end: the score below then is
    # the threshold, as "fail = above" needs
    return float(middle if below <= middle < lowest_failing else below), float(f1[best])
