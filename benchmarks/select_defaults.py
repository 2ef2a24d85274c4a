"""Choose scoring defaults on a validation split carved from the TRAINING images only.

The MTD training list (split.json "train", all good) is split by file-name hash into fit (80%) and validation
(20%). Validation defects are synthetic (models.synthetic: scratches, blobs, cut-paste, noise) pasted on the
validation good images, so no test image is ever seen here. Each variant is fitted on the fit part and scored
on validation good + validation synthetic-defect images; image and pixel AUROC are printed as a table.

    python benchmarks/select_defaults.py --data ../shared/datasets/mtd [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models.datasets import good_images
from models.evaluation import image_auroc, pixel_auroc
from models.fit import fit_scorer, holdout_split
from models.images import read_image
from models.synthetic import add_synthetic_defect
from pipeline.config import config_from_mapping

VARIANTS: dict[str, dict] = {
    "compressed-r2": {},
    "compressed-r8": {"bank": {"compression_ratio": 8}},
    "compressed-r32": {"bank": {"compression_ratio": 32}},
    "kmeans-only-r8": {"bank": {"compression_ratio": 8, "init_images": 10_000}},
    "coreset-1%": {"bank": {"kind": "coreset", "coreset_ratio": 0.01}},
    "r8-320px": {"bank": {"compression_ratio": 8}, "model": {"image_size": 320}},
    "r8-shift2": {"bank": {"compression_ratio": 8}, "scoring": {"shift_pixels": 2}},
    "r8-reweighted": {"bank": {"compression_ratio": 8}, "scoring": {"image_score": "reweighted"}},
    "r8-softmin": {"bank": {"compression_ratio": 8}, "scoring": {"image_score": "softmin", "neighbors": 3}},
}


def validation_set(paths: list[Path], seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    images, labels, masks = [], [], []
    for path in paths:
        good = read_image(path)
        images.append(good)
        labels.append(0)
        masks.append(np.zeros(good.shape[:2], bool))
        defective, mask = add_synthetic_defect(good, rng)
        images.append(defective)
        labels.append(1)
        masks.append(mask)
    return images, np.array(labels), masks


def run_variant(name: str, overrides: dict, fit_paths: list[Path], images: list[np.ndarray], labels: np.ndarray,
                masks: list[np.ndarray]) -> dict:  # fmt: skip
    config = config_from_mapping(overrides)
    started = time.perf_counter()
    scorer = fit_scorer(fit_paths, config, progress=False, holdout_fraction=0.0)
    fit_seconds = time.perf_counter() - started
    size = scorer.image_size
    scores, maps = [], []
    started = time.perf_counter()
    for start in range(0, len(images), 8):
        batch = scorer.score(images[start : start + 8])
        scores.append(batch.scores)
        maps.append(batch.maps)
    score_seconds = time.perf_counter() - started
    import cv2

    resized = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
                        for m in masks])  # fmt: skip
    return {
        "variant": name,
        "image_auroc": image_auroc(labels, np.concatenate(scores)),
        "pixel_auroc": pixel_auroc(resized, np.concatenate(maps)),
        "model": scorer.method.describe(),
        "fit_s": fit_seconds,
        "images_per_s": len(images) / score_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()
    fit_paths, validation_paths = holdout_split(good_images(args.data), 0.2)
    images, labels, masks = validation_set(validation_paths)
    print(f"fit on {len(fit_paths)} training images; validate on {len(validation_paths)} good + "
          f"{len(validation_paths)} synthetic-defect images (all from the training split)")  # fmt: skip
    print(f"{'variant':<18} {'img AUROC':>9} {'px AUROC':>9} {'model':>28} {'fit s':>6} {'img/s':>6}")
    for name in args.variants:
        result = run_variant(name, VARIANTS[name], fit_paths, images, labels, masks)
        print(f"{name:<18} {result['image_auroc']:9.4f} {result['pixel_auroc']:9.4f} {result['model']:>28} "
              f"{result['fit_s']:6.1f} {result['images_per_s']:6.1f}", flush=True)  # fmt: skip
        if args.out:
            with args.out.open("a") as stream:
                stream.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
