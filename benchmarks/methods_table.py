"""One row per method: accuracy from its evaluation report, fit time and artifact size from its model directory,
and scoring throughput re-measured here, all methods in one run so they share the machine's conditions.

Each ``--run NAME=MODEL_DIR:REPORT_DIR`` names a model made by ``lineinspect fit`` and the report made from it by
``lineinspect evaluate`` on MTD's split.json. Throughput: ``--images`` MTD test images at 224 px (the model's own
size), batches of 8, after one warm-up batch, shifting off, 2 torch threads.

    python benchmarks/methods_table.py --data ../shared/datasets/mtd \
        --run patchcore=/tmp/methods/patchcore/model:/tmp/methods/patchcore/report ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.artifact import load_scorer, read_manifest
from models.datasets import test_items
from models.images import read_image

PAPER_MTD = {  # N-pad paper's MTD table (image / pixel AUROC), WideResNet-50 backbones
    "padim": "86.88 / 82.45",
    "patchcore": "97.9 / 84.90",
    "npad": "98.22 / 85.43",
}


def throughput(model_dir: Path, images: list, batch: int = 8) -> float:
    scorer = load_scorer(model_dir, device="cpu")
    scorer.score(images[:batch])
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        scorer.score(images[start : start + batch])
    return len(images) / (time.perf_counter() - started)


@dataclass(frozen=True)
class MethodRow:
    method: str
    image_auroc: float
    pixel_auroc: float | None
    pro: float | None
    fit_s: float
    images_per_s: float
    artifact_mb: float
    paper: str

    def markdown(self) -> str:
        def percent(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f}"

        return (
            f"| {self.method} | {percent(self.image_auroc)} | {percent(self.pixel_auroc)} | {percent(self.pro)} | "
            f"{self.fit_s:.0f} | {self.images_per_s:.1f} | {self.artifact_mb:.1f} | {self.paper} |"
        )


def measure(name: str, model_dir: Path, report_dir: Path, images: list) -> MethodRow:
    manifest = read_manifest(model_dir)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    size = sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file())
    return MethodRow(
        name, metrics["image_auroc"], metrics["pixel_auroc"], metrics["pro"], manifest["training"]["fit_seconds"],
        throughput(model_dir, images), size / 1e6, PAPER_MTD.get(manifest["method"]["name"], "-"),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--run", action="append", required=True, help="NAME=MODEL_DIR:REPORT_DIR")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    items = test_items(args.data)
    images = [read_image(item.image) for item in items[:: max(1, len(items) // args.images)][: args.images]]
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| method | image AUROC | pixel AUROC | PRO | fit s | images/s | artifact MB | paper (image / pixel) |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.run:
        name, dirs = spec.split("=", 1)
        model_dir, report_dir = (Path(part) for part in dirs.split(":", 1))
        print(measure(name, model_dir, report_dir, images).markdown(), flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
