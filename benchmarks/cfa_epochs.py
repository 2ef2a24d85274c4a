"""CFA's validation AUROC after every training epoch, on the split carved from the TRAINING images only.

This is how ``[cfa] epochs`` was chosen: the MTD training list is split by file-name hash into fit (80%) and
validation (20%) as in ``select_defaults.py``; validation images are scored as captured (good) and with one
synthetic defect each. Frozen features of both are computed once (cached in ``--cache``); the compressed bank is
built from the untrained descriptor, then after each epoch the head is scored on the cached validation features
with the Scorer's post-processing (bilinear upsampling, Gaussian sigma 4, top-k mean and max image scores).
No test image is read.

    python benchmarks/cfa_epochs.py --data ../shared/datasets/mtd --epochs 10 [--set cfa.margin=30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets import good_images
from models.evaluation import image_auroc, pixel_auroc
from models.features import flatten_patches
from models.fit import TrainingImages, holdout_split
from models.images import resize_mask
from models.index import NearestNeighbourIndex
from models.methods.cfa import (
    PatchDescriptor,
    build_bank,
    cache_features,
    certainty_scores,
    dataset_loss,
    train_descriptor,
)
from models.methods.patchcore import build_extractor, embed
from models.scorer import gaussian_blur, preprocess
from pipeline.config import config_from_mapping

sys.path.insert(0, str(Path(__file__).parent))
from select_defaults import validation_set


@torch.no_grad()
def validation_metrics(head: PatchDescriptor, index: NearestNeighbourIndex, features: torch.Tensor,
                       labels: np.ndarray, masks: np.ndarray, neighbours: int, top_k: int, sigma: float,
                       size: int) -> dict[str, float]:  # fmt: skip
    """Image AUROC (top-k mean, max of the smoothed map) and pixel AUROC of ``head`` on cached features."""
    maps = []
    for start in range(0, features.shape[0], 32):
        descriptors = head(features[start : start + 32])
        views, _, grid_h, grid_w = descriptors.shape
        distances, _ = index.search(flatten_patches(descriptors).numpy(), neighbours)
        maps.append(certainty_scores(torch.from_numpy(distances).pow(2)).view(views, grid_h, grid_w))
    patch_maps = torch.cat(maps)
    upsampled = F.interpolate(patch_maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    smoothed = gaussian_blur(upsampled, sigma)
    grid_size = (int(patch_maps.shape[1]), int(patch_maps.shape[2]))
    grid = F.adaptive_avg_pool2d(upsampled[:, None], grid_size).flatten(1)
    top = grid.topk(min(top_k, grid.shape[1]), dim=1).values.mean(dim=1).numpy()
    return {
        "image_topk": round(100 * image_auroc(labels, top), 2),
        "image_max": round(100 * image_auroc(labels, smoothed.flatten(1).amax(dim=1).numpy()), 2),
        "pixel": round(100 * pixel_auroc(masks, smoothed.numpy()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/mtd"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], help="overrides like cfa.margin=30 (values parsed as JSON)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cfa-epochs-cache"))
    args = parser.parse_args()
    overrides: dict[str, dict] = {"cfa": {"epochs": args.epochs, "max_train_seconds": 1e9}}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        overrides.setdefault(section, {})[name] = json.loads(value)
    config = config_from_mapping(overrides)
    size = config.model.image_size
    args.cache.mkdir(parents=True, exist_ok=True)
    fit_paths, validation_paths = holdout_split(good_images(args.data), 0.2)
    images, labels, raw_masks, _ = validation_set(validation_paths)
    masks = np.stack([resize_mask(m, (size, size)) for m in raw_masks])
    extractor = build_extractor(config.model, torch.device("cpu"))
    fit_cache, validation_cache = args.cache / f"fit-{size}.pt", args.cache / f"validation-{size}.pt"
    if not fit_cache.exists():
        torch.save(cache_features(extractor, TrainingImages(fit_paths, size, 8), progress=True), fit_cache)
    if not validation_cache.exists():
        chunks = [embed(extractor, preprocess(images[s : s + 8], size)) for s in range(0, len(images), 8)]
        torch.save(torch.cat(chunks), validation_cache)
    features = torch.load(fit_cache, weights_only=True)
    validation = torch.load(validation_cache, weights_only=True)
    settings = config.cfa
    channels = features.shape[1]
    head = PatchDescriptor(channels, channels // settings.reduction, settings.coord_conv,
                           torch.Generator().manual_seed(settings.seed)).eval()  # fmt: skip
    started = time.perf_counter()
    bank = build_bank(head, features, config.bank)
    print(f"fit {features.shape[0]} / validation {len(validation_paths)} good + {len(validation_paths)} synthetic; "
          f"bank {bank.rows} x {bank.channels} in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    index = NearestNeighbourIndex.build(bank.features)
    sample = features[:: max(1, features.shape[0] // 64)]
    initial_spread = float(head(sample[:8]).detach().flatten(2).std(dim=2).mean())

    def report(epoch: int, trained: PatchDescriptor) -> None:
        loss = dataset_loss(trained, sample, bank, settings)
        spread = float(trained(sample[:8]).detach().flatten(2).std(dim=2).mean())
        metrics = validation_metrics(trained, index, validation, labels, masks, settings.attract_neighbors,
                                     config.scoring.top_k, config.scoring.smoothing_sigma, size)  # fmt: skip
        row = {
            "epoch": epoch,
            **metrics,
            "attraction": round(float(loss.attraction), 3),
            "repulsion": round(float(loss.repulsion), 4),
            "spread_ratio": round(spread / initial_spread, 3),
        }
        print(json.dumps(row), flush=True)

    report(0, head)
    train_descriptor(head, features, bank, settings, progress=False, on_epoch=report)


if __name__ == "__main__":
    main()
