"""A scorer's speed and resident memory over many batches: what a long-running scoring worker sees.

Scores ``--rounds`` batches of 8 frames drawn (seeded) from 200 of the dataset's test images, every ``--shift-every``-th
batch with every frame shifted (a burst of failing frames), the rest as the workers do; prints the resident set size
(VmRSS) and its peak every 25 batches and the seconds taken. Behind ``models.native``'s malloc thresholds (RESULTS.md
section 2, session 14): run it as is, and with ``MALLOC_TRIM_THRESHOLD_=131072`` (any ``MALLOC_*_`` variable leaves
glibc's own thresholds in place) to compare.

    GOMP_SPINCOUNT=10000 python benchmarks/memory_soak.py --model MODEL --data ../shared/datasets/mtd [--rounds 300]
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from pathlib import Path

from models.artifact import load_scorer
from models.datasets import test_items
from models.images import read_image
from models.native import configure_native_libraries


def resident_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--shift-every", type=int, default=4)
    args = parser.parse_args()
    print(f"native settings: {configure_native_libraries()}")
    scorer = load_scorer(args.model)
    rng = random.Random(0)
    items = test_items(args.data)
    images = [read_image(item.image) for item in rng.sample(items, min(200, len(items)))]
    started = time.perf_counter()
    for round_number in range(args.rounds):
        scorer.score(rng.sample(images, min(8, len(images))), shift_every_frame=round_number % args.shift_every == 0)
        if round_number % 25 == 24 or round_number == args.rounds - 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"batch {round_number + 1}: resident {resident_mb()} MB (peak {peak} MB), "
                  f"{time.perf_counter() - started:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
