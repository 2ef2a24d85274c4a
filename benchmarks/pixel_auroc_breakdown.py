"""Where a model's pixel AUROC goes on a labelled test set: which defect pixels rank below which defect-free pixels.

Pixel AUROC pools every pixel of every test image: positives are defect pixels, negatives the defect-free pixels of
good images **and** of defective images. This prints, for a saved model on an MVTec-layout folder or MTD:

- pixel AUROC with positives from one defect type (rows) against negatives from one source (columns: each defect
  type's defect-free pixels, the good images, all), and each type's share of the defect pixels;
- per source, the mean heatmap value of defect-free pixels far from any defect (beyond a 20 px margin at the map's
  size) and the share of frames whose map median exceeds 1 (a frame scoring above the good frames everywhere);
- per defect type, the mean heatmap value in rings at growing distance from the defect (``background_lift``'s
  rings, px at the map's size): a lift that fades with distance is the defect's reach through the features'
  receptive fields; one that stays up far from it is the defective frames differing from good ones everywhere.

A model whose defect pixels rank well above good images' pixels but not above defective images' own backgrounds
is limited by how the defective frames differ from good ones away from the defect, not by its localisation.

    python benchmarks/pixel_auroc_breakdown.py --model MODEL --data ../shared/datasets/mtd
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from background_lift import RING_LABELS, ring_means

from models.artifact import load_scorer
from models.datasets import test_items
from models.evaluation import auroc
from models.report import score_items

MARGIN_PX = 20


def ranked(positives: np.ndarray, negatives: np.ndarray) -> float:
    labels = np.r_[np.zeros(negatives.size, bool), np.ones(positives.size, bool)]
    return 100.0 * auroc(labels, np.r_[negatives, positives])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--subsample", type=int, default=5, help="use every n-th pixel (memory); 1 = all")
    args = parser.parse_args()
    scorer = load_scorer(args.model)
    scored = score_items(scorer, test_items(args.data), scorer.scoring.batch_size, True)
    known = scored.mask_known  # a defective image without a mask has no ground truth for its pixels: left out
    kept = [item for item, has_mask in zip(scored.items, known, strict=True) if has_mask]
    maps, masks = scored.maps[known], scored.masks[known]
    types = np.array([item.defect_type if item.label else "good" for item in kept])
    names = sorted(set(types) - {"good"})
    step = args.subsample
    negatives = {name: maps[(types == name)[:, None, None] & ~masks][::step] for name in [*names, "good"]}
    negatives["all"] = maps[~masks][::step]
    positives = {name: maps[(types == name)[:, None, None] & masks][::step] for name in names}
    positives["all"] = maps[masks][::step]
    total = masks.sum()
    print(f"pixel AUROC of {scorer.describe()} on {args.data} ({len(kept)} images)")
    print(f"{'positives / negatives':<22}" + "".join(f"{name[-10:]:>11}" for name in negatives) + f"{'share':>8}")
    for name, values in positives.items():
        share = masks[types == name].sum() / total if name != "all" else 1.0
        cells = "".join(f"{ranked(values, negative):11.1f}" for negative in negatives.values())
        print(f"{name[-22:]:<22}{cells}{100 * share:7.1f}%")
    margin = np.ones((2 * MARGIN_PX + 1, 2 * MARGIN_PX + 1), np.uint8)
    print(f"\ndefect-free pixels beyond {MARGIN_PX} px of a defect: mean heatmap value; frames with map median > 1")
    for name in [*names, "good"]:
        chosen = np.flatnonzero(types == name)
        far = [maps[i][cv2.dilate(masks[i].astype(np.uint8), margin) == 0] for i in chosen]
        medians = np.median(maps[chosen].reshape(len(chosen), -1), axis=1)
        mean_far = np.mean([values.mean() for values in far if values.size])
        print(f"{name[-22:]:<22}{mean_far:8.2f}{100 * np.mean(medians > 1):8.0f}%  ({len(chosen)} frames)")
    print(f"\nmean heatmap value by distance from the defect, px (good frames: {maps[types == 'good'].mean():.2f})")
    print(f"{'type':<22}{'defect':>8}" + "".join(f"{label:>8}" for label in RING_LABELS))
    for name in names:
        framed = [i for i in np.flatnonzero(types == name) if masks[i].any()]
        columns = zip(*[[float(maps[i][masks[i]].mean()), *ring_means(maps[i], masks[i])] for i in framed], strict=True)
        means = [np.mean([v for v in column if v is not None]) for column in columns]
        print(f"{name[-22:]:<22}" + "".join(f"{mean:8.2f}" for mean in means))


if __name__ == "__main__":
    main()
