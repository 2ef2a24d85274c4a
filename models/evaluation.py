"""Detection and segmentation metrics, computed with numpy (no scikit-learn).

- ``roc_curve(labels, scores)`` -> ``(fpr, tpr)``; ``auroc`` integrates it (tied scores make one diagonal step, so
  the area is the Mann-Whitney probability with ties counted half).
- ``image_auroc`` on image scores ``(N,)``; ``pixel_auroc`` on maps ``(N, H, W)`` and bool masks ``(N, H, W)``.
- ``pro_curve`` / ``pro_auc``: per-region overlap as MVTec AD defines and computes it: a pixel is flagged when its
  score is at or above the threshold; at every distinct threshold, PRO is the mean over the connected defect regions
  (8-neighbour components of each mask) of the flagged share of the region, and the FPR the flagged share of the
  defect-free pixels of all images; the area under PRO over FPR in [0, 0.3], the curve interpolated linearly at
  0.3 between the points either side of it, divided by 0.3.
- ``f1_max`` over image scores.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

PRO_FPR_LIMIT = 0.3


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` from ``(0, 0)`` to ``(1, 1)``, one point per distinct score (a score flags when >= it)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        msg = f"ROC needs both classes, got {positives} positives and {negatives} negatives"
        raise ValueError(msg)
    if np.isnan(scores).any():  # argsort puts NaN last: it would rank as the least anomalous, silently
        msg = f"ROC of scores with {int(np.isnan(scores).sum())} NaN among {scores.size}: the scorer failed on them"
        raise ValueError(msg)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    distinct = last_of_ties(sorted_scores)
    true_positives = np.cumsum(sorted_labels)[distinct]
    false_positives = (distinct + 1) - true_positives
    return np.r_[0.0, false_positives / negatives], np.r_[0.0, true_positives / positives]


def last_of_ties(sorted_scores: np.ndarray) -> np.ndarray:
    """Positions of the last score of each run of equal scores in a sorted array. Compared with ``!=``, not by
    ``np.diff``: the difference of two equal infinities is NaN, which would split their tie."""
    return np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1]


def area_under_curve(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under a ``roc_curve``."""
    return float(np.trapezoid(tpr, fpr))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return area_under_curve(*roc_curve(labels, scores))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return auroc(labels, scores)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return auroc(masks, maps)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    from models.threshold import best_f1_threshold

    return best_f1_threshold(labels, scores)[1]


def defect_regions(masks: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` bool masks -> int32 labels: 0 defect-free, 1..R the connected defect regions (8-neighbour
    components, as MVTec AD's ``scipy.ndimage.label`` with a 3x3 structure), numbered across all images."""
    regions = np.zeros(masks.shape, dtype=np.int32)
    found = 0
    for position, mask in enumerate(masks):
        if not mask.any():
            continue
        count, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        regions[position] = np.where(labelled > 0, labelled + found, 0)
        found += count - 1
    return regions


def pro_curve(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` of every distinct threshold from the highest score down, FPR ascending from ``(0, 0)``, up to
    and including the first threshold whose FPR reaches ``fpr_limit`` (what the area up to the limit needs)."""
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise ValueError(msg)
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        msg = f"masks {masks.shape} and maps {maps.shape} differ in shape"
        raise ValueError(msg)
    regions = defect_regions(masks).ravel()
    region_count = int(regions.max(initial=0))
    good_count = int(regions.size - np.count_nonzero(regions))
    if region_count == 0 or good_count == 0:
        msg = f"PRO needs defect regions and defect-free pixels, got {region_count} regions and {good_count} pixels"
        raise ValueError(msg)
    scores = maps.ravel()
    if np.isnan(scores).any():  # np.partition and >= below would drop or misplace them silently
        msg = f"PRO of maps with {int(np.isnan(scores).sum())} NaN among {scores.size} pixels: the scorer failed there"
        raise ValueError(msg)
    # Only thresholds down to the one flagging enough good pixels to reach the limit matter: keep those pixels.
    needed = min(good_count, math.ceil(fpr_limit * good_count) + 1)
    good_scores = scores[regions == 0]
    lowest = np.partition(good_scores, good_count - needed)[good_count - needed]
    del good_scores
    kept = np.flatnonzero(scores >= lowest)
    kept_scores, kept_regions = scores[kept].astype(np.float64), regions[kept]
    order = np.argsort(-kept_scores, kind="stable")
    kept_scores, kept_regions = kept_scores[order], kept_regions[order]
    region_sizes = np.bincount(regions, minlength=region_count + 1).astype(np.float64)
    overlap_steps = np.where(kept_regions > 0, 1.0 / region_sizes[kept_regions], 0.0)
    thresholds = last_of_ties(kept_scores)
    fpr = np.cumsum(kept_regions == 0)[thresholds] / good_count
    pro = np.cumsum(overlap_steps)[thresholds] / region_count
    return np.r_[0.0, fpr], np.r_[0.0, np.minimum(pro, 1.0)]


def pro_auc(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return pro_auc_from_curve(fpr, pro, fpr_limit)


def pro_auc_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under ``pro`` over FPR in [0, fpr_limit] / ``fpr_limit``: trapezoids between the curve's points, the
    last one cut at the limit (``pro`` interpolated linearly between the points either side of it). The curve must
    start at FPR 0 and reach the limit (``pro_curve``'s does), FPR ascending."""
    fpr, pro = np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}"
        raise ValueError(msg)
    if fpr.size == 0 or fpr[0] != 0.0 or fpr[-1] < fpr_limit:
        msg = f"a PRO curve must run from FPR 0 to at least {fpr_limit}, got {fpr[:1]} .. {fpr[-1:]}"
        raise ValueError(msg)
    beyond = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point at or past the limit (>= 1)
    before = beyond - 1
    share = (fpr_limit - fpr[before]) / (fpr[beyond] - fpr[before])
    pro_at_limit = pro[before] + share * (pro[beyond] - pro[before])
    area = np.trapezoid(np.r_[pro[:beyond], pro_at_limit], np.r_[fpr[:beyond], fpr_limit])
    return float(area / fpr_limit)
