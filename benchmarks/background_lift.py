"""How much a defect lifts the heatmap of its frame's defect-free background, on the validation split.

MTD's pixel AUROC is held down by the backgrounds of defective tiles, which score above good tiles' pixels
(``pixel_auroc_breakdown.py``, on the test split). This asks the same of the validation split of the training
images with synthetic defects (``select_defaults.py``), variant by variant, so that a remedy can be judged without
the test split: each variant is fitted on the fit part and scores the standard, surface and large sets.

Printed per set: the mean map (z units when positions are normalised) of good frames; of defective frames' pixels
more than ``--margin`` px (at the scored size) from their defect; and the AUROC of defect pixels against good
frames' pixels and against defective frames' defect-free pixels.

    python benchmarks/background_lift.py --data ../shared/datasets/mtd --variants default raw patchcore
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from select_defaults import VALIDATION_SETS, VARIANTS, fit_and_score, good_images, holdout_split, validation_set

from models.evaluation import auroc

SETS = ("standard", "surface", "large")


def lift(maps: np.ndarray, masks: list[np.ndarray], good: np.ndarray, margin: float) -> dict[str, float]:
    """``maps (N, S, S)``, masks at any size, ``good (N,)`` bool -> background means and defect-pixel AUROCs."""
    size = maps.shape[-1]
    resized = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
                        for m in masks])  # fmt: skip
    defective_maps, defective_masks = maps[~good], resized[~good]
    far = [frame[cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5) > margin].mean()
           for frame, mask in zip(defective_maps, defective_masks, strict=True) if mask.any()]  # fmt: skip
    defect = defective_maps[defective_masks]
    good_pixels, background = maps[good].ravel(), defective_maps[~defective_masks]

    def against(negatives: np.ndarray) -> float:
        labels = np.concatenate([np.ones(defect.size, bool), np.zeros(negatives.size, bool)])
        return auroc(labels, np.concatenate([defect, negatives]))

    return {"good_mean": float(good_pixels.mean()), "background_mean": float(np.mean(far)),
            "vs_good": against(good_pixels), "vs_background": against(background)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--variants", nargs="+", default=["default"], help="names from select_defaults.VARIANTS")
    parser.add_argument("--margin", type=float, default=15.0, help="background: pixels farther than this from defect")
    args = parser.parse_args()
    fit_paths, validation_paths = holdout_split(good_images(args.data), 0.2)
    sets = {name: validation_set(validation_paths, 0, *VALIDATION_SETS[name]) for name in SETS}
    print(f"{'variant':<28} {'set':<9} {'good mean':>9} {'bg mean':>8} {'vs good':>8} {'vs bg':>7}")
    for variant in args.variants:
        _, outputs = fit_and_score(VARIANTS[variant], fit_paths, sets)
        for name, validation in sets.items():
            good = np.array(validation.kinds) == "good"
            row = lift(outputs[name][1], validation.masks, good, args.margin)
            print(f"{variant:<28} {name:<9} {row['good_mean']:9.2f} {row['background_mean']:8.2f} "
                  f"{100 * row['vs_good']:8.1f} {100 * row['vs_background']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
