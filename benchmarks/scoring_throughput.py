"""Scorer throughput and N-pad shifting robustness on a fitted model.

Throughput: batches of ``--batch`` real images scored repeatedly (after one warm-up batch); prints images/s and
milliseconds per image for backbone, search and post-processing, for each shift size given.

Shift robustness (``--misalign``): every test image is translated by up to ``--misalign`` pixels and rotated by up
to ``--rotate`` degrees (seeded), then image AUROC is measured with each shift size: how much of the accuracy lost
to misalignment shifting recovers; with the model's threshold also the verdicts: good frames rejected, defective
ones caught.

Since session 8 shifting re-scores only the frames that fail unshifted (``[scoring] shift_only_failing``), so its
cost depends on how many fail: ``--frames good`` times the test split's good frames only (a line where nearly every
part passes), ``all`` its mix (two thirds defective on MTD). ``--shift-every-frame`` shifts every frame instead.

``--competitor busy`` (a pure-Python busy loop: one core taken) or ``matmul`` (numpy matrix products on its BLAS
threads) runs another process beside the timed rounds: a host shared with other software. The scoring workers set
GOMP_SPINCOUNT=10000 before torch loads (``workers.score.limit_threads``); this script does not, so set it in its
environment to time what the workers do (unset: GNU OpenMP's default busy-wait).

    python benchmarks/scoring_throughput.py --model MODEL --data ../shared/datasets/mtd --shifts 0 2 4 \
        [--frames good] [--shift-every-frame] [--misalign 8 --rotate 3] [--competitor busy]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from models.artifact import load_scorer
from models.datasets import test_items
from models.evaluation import image_auroc
from models.images import read_image
from models.scorer import Scorer


def throughput(scorer: Scorer, images: list[np.ndarray], batch: int, rounds: int) -> dict[str, float]:
    scorer.score(images[:batch])
    totals = {"backbone": 0.0, "search": 0.0, "postprocess": 0.0}
    count = 0
    started = time.perf_counter()
    for round_number in range(rounds):
        start = (round_number * batch) % max(1, len(images) - batch)
        result = scorer.score(images[start : start + batch])
        totals["backbone"] += result.timings.backbone_s
        totals["search"] += result.timings.search_s
        totals["postprocess"] += result.timings.postprocess_s
        count += batch
    elapsed = time.perf_counter() - started
    return {"images_per_s": count / elapsed} | {f"{k}_ms": 1000 * v / count for k, v in totals.items()}


def misalignment(size: int, rng: np.random.Generator, pixels: float, degrees: float) -> np.ndarray:
    """A random ``(2, 3)`` affine map of a ``size`` x ``size`` image: rotation by up to ``degrees`` about its
    centre, then translation by up to ``pixels`` along each axis."""
    angle = float(rng.uniform(-degrees, degrees))
    matrix = np.asarray(cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0), dtype=np.float64)
    matrix[:, 2] += rng.uniform(-pixels, pixels, size=2)
    return matrix


def misaligned(image: np.ndarray, matrix: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``image`` moved by ``matrix`` (``misalignment``); borders reflected."""
    height, width = image.shape[:2]
    return cv2.warpAffine(image, matrix, (width, height), flags=interpolation, borderMode=cv2.BORDER_REFLECT)


# Other software on the host: one core busy, or BLAS-threaded matrix products (numpy's own thread pool)
COMPETITORS = {
    "busy": "while True: pass",
    "matmul": "import numpy as np\na = np.random.rand(800, 800).astype(np.float32)\nwhile True: a @ a",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--misalign", type=float, default=0.0, help="max translation in pixels (of the scored size)")
    parser.add_argument("--rotate", type=float, default=0.0, help="max rotation in degrees")
    parser.add_argument("--frames", choices=["all", "good"], default="all", help="test frames timed")
    parser.add_argument("--shift-every-frame", action="store_true", help="shift frames that pass unshifted too")
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), help="another process busy beside the rounds")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    base = load_scorer(args.model, device="cpu")
    items = test_items(args.data)
    images = [read_image(item.image) for item in items]
    labels = np.array([item.label for item in items])

    def shifting(shift: int) -> Scorer:
        update = {"shift_pixels": shift, "shift_only_failing": not args.shift_every_frame}
        return base.with_scoring(base.scoring.model_copy(update=update))

    good = [image for image, label in zip(images, labels, strict=True) if label == 0]
    # a seeded shuffle: the rounds' batches then mix good and defective frames as the chosen set does (the test list
    # is ordered good first; with shifting only failing frames are shifted, so the mix sets the cost)
    chosen = images if args.frames == "all" else good
    timed = [chosen[index] for index in np.random.default_rng(0).permutation(len(chosen))]
    competitor = None
    if args.competitor:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]])
        time.sleep(1.0)  # let it start (numpy's import) before timing
    try:
        for shift in args.shifts:
            speed = throughput(shifting(shift), timed, args.batch, args.rounds)
            print(f"shift {shift} ({args.frames} frames{', beside ' + args.competitor if competitor else ''}): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()), flush=True)  # fmt: skip
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if args.misalign or args.rotate:
        rng = np.random.default_rng(0)
        size = base.image_size
        moved = []
        for image in images:
            resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            moved.append(misaligned(resized, misalignment(size, rng, args.misalign, args.rotate)))
        for shift in args.shifts:
            scorer = shifting(shift)
            aligned_scores = np.concatenate([scorer.score(images[i : i + 8]).scores for i in range(0, len(images), 8)])
            moved_scores = np.concatenate([scorer.score(moved[i : i + 8]).scores for i in range(0, len(moved), 8)])
            print(f"shift {shift}: image AUROC as captured {image_auroc(labels, aligned_scores):.4f}, "
                  f"misaligned (<= {args.misalign} px, <= {args.rotate} deg) {image_auroc(labels, moved_scores):.4f}",
                  flush=True)  # fmt: skip
            if base.threshold is not None:
                for name, scores in (("as captured", aligned_scores), ("misaligned", moved_scores)):
                    failed = scores > base.threshold.value
                    print(f"  {name} at threshold {base.threshold.value:.3f}: good rejected "
                          f"{100 * failed[labels == 0].mean():.2f}%, defective caught "
                          f"{100 * failed[labels == 1].mean():.1f}%", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
