"""Detection and segmentation metrics, computed with numpy (no scikit-learn).

- ``roc_curve(labels, scores)`` -> ``(fpr, tpr)``; ``auroc`` integrates it (ties handled as one step).
- ``image_auroc`` on image scores ``(N,)``; ``pixel_auroc`` on maps ``(N, H, W)`` and bool masks ``(N, H, W)``.
- ``pro_curve`` / ``pro_auc``: per-region overlap (MVTec AD): for each threshold, the mean over connected defect
  regions of the fraction of the region above threshold, against the false-positive rate on good pixels;
  integrated up to FPR 0.3 and divided by 0.3.
- ``f1_max`` over image scores.
"""

from __future__ import annotations

import cv2
import numpy as np

PRO_FPR_LIMIT = 0.3


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        msg = f"ROC needs both classes, got {positives} positives and {negatives} negatives"
        raise ValueError(msg)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[distinct]
    false_positives = (distinct + 1) - true_positives
    return np.r_[0.0, false_positives / negatives], np.r_[0.0, true_positives / positives]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return auroc(labels, scores)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return auroc(masks, maps)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    from models.threshold import best_f1_threshold

    return best_f1_threshold(labels, scores)[1]


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT, thresholds: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at ``thresholds`` levels spread evenly over FPR in [0, fpr_limit], FPR ascending."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    region_scores: list[np.ndarray] = []
    for mask, anomaly_map in zip(masks, maps, strict=True):
        if not mask.any():
            continue
        count, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        region_scores.extend(np.sort(anomaly_map[labelled == region]) for region in range(1, count))
    if not region_scores:
        msg = "PRO needs at least one defect region in the masks"
        raise ValueError(msg)
    good_pixels = np.sort(maps[~masks])
    ranks = np.round((1.0 - np.linspace(0.0, fpr_limit, thresholds)) * (good_pixels.size - 1)).astype(np.int64)
    levels = good_pixels[ranks]
    fpr = 1.0 - np.searchsorted(good_pixels, levels, side="right") / good_pixels.size
    overlaps = np.stack([1.0 - np.searchsorted(scores, levels, side="right") / scores.size for scores in region_scores])
    return fpr, overlaps.mean(axis=0)


def pro_auc(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return pro_auc_from_curve(fpr, pro, fpr_limit)


def pro_auc_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under ``pro`` over FPR in [0, fpr_limit] (curve clipped and interpolated at the limit), / limit."""
    keep = fpr <= fpr_limit
    fpr_kept, pro_kept = np.r_[0.0, fpr[keep]], np.r_[0.0, pro[keep]]
    if fpr_kept[-1] < fpr_limit:
        fpr_kept, pro_kept = np.r_[fpr_kept, fpr_limit], np.r_[pro_kept, float(np.interp(fpr_limit, fpr, pro))]
    return float(np.trapezoid(pro_kept, fpr_kept) / fpr_limit)
