"""How much re-encoding a frame moves its score: a line that fits on stored images and scores what its cameras send.

The held-out good images of a dataset (every ``--every``-th, split.json's ``test_good`` or MVTec's ``test/good``) are
scored as stored, re-encoded as PNG (lossless: the same pixels) and as JPEG at each ``--jpeg-quality``, every frame
shifted as calibration does. Prints the median, 90th percentile and maximum score per encoding, how many exceed the
model's threshold, and the mean change against the stored images. Only the good images are read: nothing here
chooses a setting.

    python benchmarks/encoding_shift.py --model MODEL --data ../shared/datasets/mtd [--every 4] [--jpeg-quality 90 75]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from models.artifact import load_scorer
from models.datasets import test_items
from models.images import decode_image, read_image


def reencode(extension: str, params: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    def apply(image_rgb: np.ndarray) -> np.ndarray:
        ok, buffer = cv2.imencode(extension, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:
            msg = f"cv2 could not encode {extension}"
            raise RuntimeError(msg)
        return decode_image(buffer.tobytes())

    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--every", type=int, default=4, help="score every N-th held-out good image")
    parser.add_argument("--jpeg-quality", type=int, nargs="+", default=[90, 75])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scorer = load_scorer(args.model)
    if scorer.threshold is None:
        parser.error(f"{args.model} has no threshold: run `lineinspect calibrate` first")
    threshold = scorer.threshold.value
    images = [read_image(item.image) for item in test_items(args.data) if item.label == 0][:: args.every]
    encodings: dict[str, Callable[[np.ndarray], np.ndarray]] = {"stored": lambda image: image}
    encodings["png"] = reencode(".png", [])
    for quality in args.jpeg_quality:
        encodings[f"jpeg q{quality}"] = reencode(".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality])
    scores: dict[str, np.ndarray] = {}
    for name, encode in encodings.items():
        batches = [
            scorer.score([encode(image) for image in images[start : start + args.batch]], shift_every_frame=True)
            for start in range(0, len(images), args.batch)
        ]
        scores[name] = np.concatenate([batch.scores for batch in batches])
        print(f"scored {len(images)} good images as {name}", flush=True)
    print(f"\nmodel {scorer.model_id}, threshold {threshold:.2f}, {len(images)} held-out good images of {args.data}")
    print("| encoding | median | 90th percentile | max | above threshold | mean change vs stored |")
    print("|---|---|---|---|---|---|")
    for name, values in scores.items():
        median, p90, peak = np.quantile(values, [0.5, 0.9, 1.0])
        above = int((values > threshold).sum())
        change = float((values - scores["stored"]).mean())
        print(f"| {name} | {median:.2f} | {p90:.2f} | {peak:.2f} | {above} of {len(values)} | {change:+.2f} |")


if __name__ == "__main__":
    main()
