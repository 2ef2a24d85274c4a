"""Evaluating a Scorer on a labelled dataset and writing the report a person looks at.

``evaluate(scorer, items, out_dir)`` first checks, before anything is scored, every image against the model's
inspection mask (``InspectionMask.check_files``: images of another aspect, which the model refuses, are a MaskError
giving their count and one of them) and every mask against its image (``models.datasets.check_masks``: one that
cannot be read or has another aspect ratio than its image is a DatasetError naming it), scores every test image in
batches (progress bar; with shifting on, every frame shifted unless ``shift_every_frame=False``), resizes masks to
the map size ``(S, S)`` (nearest, centre on centre as the frames are resized), and writes to ``out_dir``:

- ``metrics.json``: image_auroc, pixel_auroc, pro (FPR <= 0.3, normalised), f1_max, images_per_second,
  per-defect-type image and pixel AUROC (each type's images with the good ones), score summaries, and the model's
  threshold with its false-reject / detection rates. Image metrics use every readable image; pixel metrics only
  those with a known mask (good images: all zero), and ``defective_without_mask`` counts the defective images left
  out (a warning names a few);
- ``roc.png`` (image and pixel ROC with the threshold's operating point, and each defect type's image ROC beside
  them) and ``pro.png`` (PRO curve to FPR 0.3): the curves whose areas ``metrics.json`` reports;
- ``overlays/``: heatmap overlays (``models.heatmap``: verdict, score and colour scale written under each, the
  ground-truth mask outlined in magenta) named by their verdict at the model's threshold (``overlay_groups``): the
  highest-scoring caught defects (``detected``), the lowest-scoring missed ones (``missed``), the highest-scoring
  rejected good images (``false_alarm``) and the good images that passed closest to the threshold
  (``good_passed``); a previous run's overlays there are removed first.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from models.datasets import DatasetError, TestItem, check_masks, mask_shape_problem
from models.evaluation import (
    area_under_curve,
    f1_max,
    pixel_auroc,
    pro_auc_from_curve,
    pro_curve,
    roc_curve,
)
from models.heatmap import overlay_heatmap
from models.images import ImageError, read_image, read_mask, resize_mask
from models.scorer import Scorer

OVERLAYS_PER_GROUP = 4
# the names _write_overlays gives, f"{group}_{defect_type}_{stem}_score{score:.3f}.png": the files it may replace
OVERLAY_GROUPS = ("detected", "missed", "false_alarm", "good_passed", "highest_defect", "lowest_defect", "highest_good")
OVERLAY_NAME = re.compile(rf"({'|'.join(OVERLAY_GROUPS)})_.+_score(-?\d+\.\d{{3}}|-?inf|nan)\.png")
NAMED_WITHOUT_MASK = 5
PLOTTED_POINTS = 2000  # a pixel curve has a point per distinct score (millions): plotted through this many x steps

log = logging.getLogger(__name__)


class ScoredItems(NamedTuple):
    """The readable test items, their scores ``(N,)``, maps ``(N, S, S)``, masks ``(N, S, S)`` (all zero where no
    mask is known) and the scoring seconds."""

    items: list[TestItem]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    seconds: float

    @property
    def mask_known(self) -> np.ndarray:
        """``(N,)`` bool: the images whose masks are ground truth (good ones, and defective ones with a mask)."""
        return np.array([item.has_mask for item in self.items], dtype=bool)


def _read_item_mask(item: TestItem, image_shape: tuple[int, int], size: int) -> np.ndarray:
    if item.mask is None:
        return np.zeros((size, size), dtype=bool)
    mask = read_mask(item.mask)
    problem = mask_shape_problem(item.mask, (mask.shape[0], mask.shape[1]), item.image, image_shape)
    if problem is not None:  # check_masks saw it from the image's header; the decoded image disagrees
        msg = f"{problem}; fix or replace the mask"
        raise DatasetError(msg)
    return resize_mask(mask, (size, size))


def score_items(
    scorer: Scorer, items: Sequence[TestItem], batch_size: int, progress: bool, shift_every_frame: bool = True
) -> ScoredItems:
    """Score the readable items (unreadable images are skipped with a message) and read their masks, resized
    (nearest, centre-aligned) to the map size. Every image's aspect (``InspectionMask.check_files``, with an inspection
    mask) and every mask (``models.datasets.check_masks``) are checked first: images the model would refuse or an
    unusable mask stop evaluation before anything is scored. With shifting on, every frame is shifted by default
    (``Scorer.score``): threshold-free metrics then rank shifting's own scores, not the unshifted ones of frames
    that pass (the verdicts are the same either way)."""
    if scorer.inspection_mask is not None:
        scorer.inspection_mask.check_files([item.image for item in items], "test images")
    check_masks(items)
    size = scorer.image_size
    kept: list[TestItem] = []
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    scoring_seconds = 0.0
    bar = tqdm(total=len(items), desc="evaluate: scoring test images", unit="img", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = []
        for item in chunk:
            try:
                image = read_image(item.image, keep_depth=True)
            except ImageError as error:
                tqdm.write(f"skipping unreadable test image: {error}")
                continue
            masks.append(_read_item_mask(item, (image.shape[0], image.shape[1]), size))
            images.append(image)
            kept.append(item)
        if images:
            tic = time.perf_counter()
            batch = scorer.score(images, shift_every_frame=shift_every_frame)
            scoring_seconds += time.perf_counter() - tic
            scores.append(batch.scores)
            maps.append(batch.maps)
        bar.update(len(chunk))
    bar.close()
    if not kept:
        msg = "no readable test image"
        raise ValueError(msg)
    return ScoredItems(kept, np.concatenate(scores), np.concatenate(maps), np.stack(masks), scoring_seconds)


Curve = tuple[np.ndarray, np.ndarray]  # (x, y), x ascending


def _thinned(x: np.ndarray, y: np.ndarray, points: int = PLOTTED_POINTS) -> Curve:
    """A curve with ``x`` ascending, for plotting: the points at and either side of ``points`` evenly spaced x values
    (both ends of a vertical step there are kept); short curves as they are."""
    if x.size <= 2 * points:
        return x, y
    grid = np.linspace(x[0], x[-1], points)
    keep = np.unique(np.r_[0, np.searchsorted(x, grid, side="left"), np.searchsorted(x, grid, side="right") - 1,
                           x.size - 1].clip(0, x.size - 1))  # fmt: skip
    return x[keep], y[keep]


class Curves(NamedTuple):
    """What the report plots: the curves whose areas ``metrics.json`` reports (pixel ones thinned), each defect
    type's image ROC (its images with the good ones) and the threshold's operating point ``(fpr, tpr)`` on the
    image ROC (None without a threshold)."""

    image_roc: Curve
    pixel_roc: Curve | None
    pro: Curve | None
    image_roc_by_type: dict[str, Curve]
    operating_point: tuple[float, float] | None


def _plot_curves(out_dir: Path, curves: Curves, metrics: dict[str, Any]) -> None:
    """``roc.png`` (image and pixel ROC with the threshold's operating point; beside it, with more than one defect
    type, each type's image ROC) and ``pro.png`` (up to FPR 0.3, the integrated area shaded)."""
    source = f"model {metrics['model_id']}: {metrics['images']} images, {metrics['defective_images']} defective"
    by_type = curves.image_roc_by_type if len(curves.image_roc_by_type) > 1 else {}
    figure, axes = plt.subplots(1, 2 if by_type else 1, figsize=(10 if by_type else 5.4, 5.4), squeeze=False)
    axis = axes[0, 0]
    axis.plot(*curves.image_roc, label=f"image AUROC {metrics['image_auroc']:.4f}")
    if curves.pixel_roc is not None:
        axis.plot(*curves.pixel_roc, label=f"pixel AUROC {metrics['pixel_auroc']:.4f}")
    if curves.operating_point is not None:
        fpr, tpr = curves.operating_point
        label = f"threshold {metrics['threshold']:.3g}: {fpr:.1%} good rejected, {tpr:.1%} defective caught"
        axis.plot([fpr], [tpr], "o", color="black", markersize=7, fillstyle="none", label=label)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="false-positive rate (good images / good pixels)", ylabel="true-positive rate", title="ROC",
             xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    axis.legend(loc="lower right", fontsize="small")
    if by_type:
        axis = axes[0, 1]
        pixel_by_type = metrics["pixel_auroc_by_type"]
        for defect_type, curve in by_type.items():
            pixel = f", pixel {pixel_by_type[defect_type]:.3f}" if defect_type in pixel_by_type else ""
            auroc_text = f"{metrics['image_auroc_by_type'][defect_type]:.3f}"
            axis.plot(*curve, label=f"{defect_type}: image {auroc_text}{pixel}")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axis.set(xlabel="false-positive rate (good images)", ylabel="true-positive rate",
                 title="image ROC by defect type (each with the good images)", xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        axis.legend(loc="lower right", fontsize="small")
    figure.suptitle(source, fontsize="small")
    figure.tight_layout()
    figure.savefig(out_dir / "roc.png", dpi=110)
    plt.close(figure)
    if curves.pro is not None:
        figure, axis = plt.subplots(figsize=(5.4, 5.4))
        axis.plot(*curves.pro, label=f"PRO area to FPR 0.3 (normalised) {metrics['pro']:.4f}")
        axis.fill_between(*curves.pro, alpha=0.15)
        axis.set(xlabel="false-positive rate (good pixels), integrated to 0.3", ylabel="per-region overlap",
                 title="PRO", xlim=(0, 0.3), ylim=(0, 1))  # fmt: skip
        axis.legend(loc="lower right", fontsize="small")
        figure.suptitle(source, fontsize="small")
        figure.tight_layout()
        figure.savefig(out_dir / "pro.png", dpi=110)
        plt.close(figure)
    else:  # no pixel ground truth this time: an earlier run's curve must not pass for this one's
        (out_dir / "pro.png").unlink(missing_ok=True)


def overlay_groups(labels: np.ndarray, scores: np.ndarray, threshold: float | None,
                   per_group: int = OVERLAYS_PER_GROUP) -> dict[str, np.ndarray]:  # fmt: skip
    """Which images get an overlay, by group name: positions into ``labels`` / ``scores``, at most ``per_group`` each.

    With a threshold (fail = score above it) the groups are verdicts, so a name never contradicts the score in it:
    ``detected`` (defects failed, highest first), ``missed`` (defects passed, lowest first), ``false_alarm`` (good
    images failed, highest first) and ``good_passed`` (good images passed, highest first: the margin). A group with
    no such image is empty. Without a threshold: ``highest_defect``, ``lowest_defect`` and ``highest_good``.
    """
    defects, goods = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)

    def ranked(positions: np.ndarray, highest_first: bool) -> np.ndarray:
        order = np.argsort(-scores[positions] if highest_first else scores[positions], kind="stable")
        return positions[order][:per_group]

    if threshold is None:
        return {
            "highest_defect": ranked(defects, highest_first=True),
            "lowest_defect": ranked(defects, highest_first=False),
            "highest_good": ranked(goods, highest_first=True),
        }
    failed = scores > threshold
    return {
        "detected": ranked(defects[failed[defects]], highest_first=True),
        "missed": ranked(defects[~failed[defects]], highest_first=False),
        "false_alarm": ranked(goods[failed[goods]], highest_first=True),
        "good_passed": ranked(goods[~failed[goods]], highest_first=True),
    }


def _write_overlays(out_dir: Path, scorer: Scorer, items: list[TestItem], scores: np.ndarray,
                    maps: np.ndarray) -> None:  # fmt: skip
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    for stale in overlay_dir.iterdir():  # a previous run's overlays, possibly of another model
        if OVERLAY_NAME.fullmatch(stale.name) and stale.is_file():
            stale.unlink()
    labels = np.array([item.label for item in items])
    threshold = scorer.threshold.value if scorer.threshold else None
    for group, positions in overlay_groups(labels, scores, threshold).items():
        for position in positions:
            item = items[position]
            mask = read_mask(item.mask) if item.mask is not None else None  # outlined at the frame's resolution
            picture = overlay_heatmap(read_image(item.image, keep_depth=True), maps[position], threshold,
                                      float(scores[position]), mask)  # fmt: skip
            name = f"{group}_{item.defect_type}_{item.image.stem}_score{scores[position]:.3f}.png"
            cv2.imwrite(str(overlay_dir / name), picture)


def evaluate(
    scorer: Scorer,
    items: Sequence[TestItem],
    out_dir: Path,
    batch_size: int = 8,
    progress: bool = True,
    shift_every_frame: bool = True,
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept, scores, maps, masks, seconds = scored = score_items(scorer, items, batch_size, progress, shift_every_frame)
    labels = np.array([item.label for item in kept])
    known = scored.mask_known
    without_mask = [item.image for item in kept if not item.has_mask]
    if without_mask:
        named = ", ".join(str(image) for image in without_mask[:NAMED_WITHOUT_MASK])
        more = f" and {len(without_mask) - NAMED_WITHOUT_MASK} more" if len(without_mask) > NAMED_WITHOUT_MASK else ""
        log.warning("%d defective images have no mask and are left out of pixel AUROC and PRO (image metrics use "
                    "them): %s%s", len(without_mask), named, more)  # fmt: skip
    # pixel metrics only over images whose pixels have a ground truth (copies only when some have none)
    pixel_masks, pixel_maps = (masks, maps) if known.all() else (masks[known], maps[known])
    image_roc = roc_curve(labels, scores)  # roc.png plots the curves whose areas metrics.json reports
    metrics: dict[str, Any] = {
        "model_id": scorer.model_id,
        "model": scorer.describe(),
        "images": len(kept),
        "defective_images": int(labels.sum()),
        "defective_without_mask": len(without_mask),
        "image_auroc": area_under_curve(*image_roc),
        "f1_max": f1_max(labels, scores),
        "images_per_second": len(kept) / seconds if seconds > 0 else None,
        "image_size": scorer.image_size,
        "shift_pixels": scorer.scoring.shift_pixels,
        "shift_every_frame": shift_every_frame,
    }
    pixel_roc = pro_plotted = None
    if pixel_masks.any():
        pixel_fpr, pixel_tpr = roc_curve(pixel_masks, pixel_maps)
        metrics["pixel_auroc"] = area_under_curve(pixel_fpr, pixel_tpr)
        pixel_roc = _thinned(pixel_fpr, pixel_tpr)
        del pixel_fpr, pixel_tpr  # a point per distinct pixel score
        pro_fpr, pro = pro_curve(pixel_masks, pixel_maps)
        metrics["pro"] = pro_auc_from_curve(pro_fpr, pro)
        pro_plotted = _thinned(pro_fpr, pro)
    else:
        metrics["pixel_auroc"] = metrics["pro"] = None
    per_type, pixel_per_type, roc_by_type = {}, {}, {}
    for defect_type in sorted({item.defect_type for item in kept} - {"good"}):  # the type's images + the good ones
        chosen = np.array([item.defect_type in ("good", defect_type) for item in kept])
        roc_by_type[defect_type] = roc_curve(labels[chosen], scores[chosen])
        per_type[defect_type] = area_under_curve(*roc_by_type[defect_type])
        chosen &= known
        if masks[chosen].any():
            pixel_per_type[defect_type] = pixel_auroc(masks[chosen], maps[chosen])
    metrics["image_auroc_by_type"] = per_type
    metrics["pixel_auroc_by_type"] = pixel_per_type
    operating_point = None
    if scorer.threshold is not None:
        failed = np.array(scorer.verdicts(scores))
        metrics["threshold"] = scorer.threshold.value
        metrics["false_reject_rate"] = float(failed[labels == 0].mean()) if (labels == 0).any() else None
        metrics["detection_rate"] = float(failed[labels == 1].mean()) if (labels == 1).any() else None
        operating_point = (float(failed[labels == 0].mean()), float(failed[labels == 1].mean()))  # both classes: ROC
    _plot_curves(out_dir, Curves(image_roc, pixel_roc, pro_plotted, roc_by_type, operating_point), metrics)
    _write_overlays(out_dir, scorer, kept, scores, maps)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    scores_table = [{"image": str(item.image), "label": item.label, "score": float(score)}
                    for item, score in zip(kept, scores, strict=True)]  # fmt: skip
    (out_dir / "scores.json").write_text(json.dumps(scores_table, indent=1))
    return metrics
