"""How much a defect lifts the heatmap of its frame's defect-free background, on the validation split.

MTD's pixel AUROC is held down by the backgrounds of defective tiles, which score above good tiles' pixels
(``pixel_auroc_breakdown.py``, on the test split). This asks the same of the validation split of the training
images with synthetic defects (``select_defaults.py``), variant by variant, so that a remedy can be judged without
the test split: each variant is fitted on the fit part and scores the standard, surface and large sets.

Printed per set: the mean map (z units when positions are normalised) of good frames; of defective frames' pixels
more than ``--margin`` px (at the scored size) from their defect; and the AUROC of defect pixels against good
frames' pixels and against defective frames' defect-free pixels. Then, since each defective frame is a copy of the
good frame before it with only the defect's pixels changed, the paired lift: the defective frame's map less its
good twin's, averaged over rings at growing distance from the defect (``DISTANCE_RINGS``, px at the scored size):
how far a defect's influence on the map reaches.

    python benchmarks/background_lift.py --data ../shared/datasets/mtd --variants default raw patchcore
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import cv2
import numpy as np
from select_defaults import VALIDATION_SETS, VARIANTS, fit_and_score, good_images, holdout_split, validation_set

from models.evaluation import auroc
from models.images import resize_mask

SETS = ("standard", "surface", "large")
DISTANCE_RINGS = (0, 5, 10, 20, 40, 80, 10_000)


def lift(maps: np.ndarray, masks: list[np.ndarray], good: np.ndarray, margin: float) -> dict[str, float]:
    """``maps (N, S, S)``, masks at any size, ``good (N,)`` bool -> background means and defect-pixel AUROCs."""
    size = maps.shape[-1]
    resized = np.stack([resize_mask(m, (size, size)) for m in masks])
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


RING_LABELS = [f"{inner}-{outer}" if outer < DISTANCE_RINGS[-1] else f">{inner}"
               for inner, outer in itertools.pairwise(DISTANCE_RINGS)]  # fmt: skip


def ring_means(values: np.ndarray, mask: np.ndarray) -> list[float | None]:
    """``values (S, S)``, defect ``mask (S, S)`` bool, not empty -> mean of ``values`` in each ring of
    ``DISTANCE_RINGS`` around the defect (None where a ring holds no pixel)."""
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    rings = [(distance > inner) & (distance <= outer) for inner, outer in itertools.pairwise(DISTANCE_RINGS)]
    return [float(values[ring].mean()) if ring.any() else None for ring in rings]


def paired_lift(maps: np.ndarray, masks: list[np.ndarray]) -> list[float]:
    """``maps (2P, S, S)`` of good / defective twins in turn -> mean of defective less good per distance ring."""
    size = maps.shape[-1]
    per_ring: list[list[float]] = [[] for _ in RING_LABELS]
    for good_map, defective_map, mask in zip(maps[0::2], maps[1::2], masks[1::2], strict=True):
        resized = resize_mask(mask, (size, size))
        if resized.any():
            for ring, mean in enumerate(ring_means(defective_map - good_map, resized)):
                if mean is not None:
                    per_ring[ring].append(mean)
    return [float(np.mean(values)) if values else float("nan") for values in per_ring]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--variants", nargs="+", default=["default"], help="names from select_defaults.VARIANTS")
    parser.add_argument("--margin", type=float, default=15.0, help="background: pixels farther than this from defect")
    args = parser.parse_args()
    fit_paths, validation_paths = holdout_split(good_images(args.data), 0.2)
    sets = {name: validation_set(validation_paths, 0, *VALIDATION_SETS[name]) for name in SETS}
    print(f"{'variant':<28} {'set':<9} {'good mean':>9} {'bg mean':>8} {'vs good':>8} {'vs bg':>7}")
    profiles = []
    for variant in args.variants:
        _, outputs = fit_and_score(VARIANTS[variant], fit_paths, sets)
        for name, validation in sets.items():
            good = np.array(validation.kinds) == "good"
            row = lift(outputs[name][1], validation.masks, good, args.margin)
            print(
                f"{variant:<28} {name:<9} {row['good_mean']:9.2f} {row['background_mean']:8.2f} "
                f"{100 * row['vs_good']:8.1f} {100 * row['vs_background']:7.1f}",
                flush=True,
            )
            profiles.append((variant, name, paired_lift(outputs[name][1], validation.masks)))
    print("\npaired lift (defective frame's map less its good twin's) by distance from the defect, px")
    print(f"{'variant':<28} {'set':<9} " + " ".join(f"{ring:>7}" for ring in RING_LABELS))
    for variant, name, profile in profiles:
        print(f"{variant:<28} {name:<9} " + " ".join(f"{value:7.2f}" for value in profile))


if __name__ == "__main__":
    main()
