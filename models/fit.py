"""Fitting a Scorer on good images: embed in batches, build the bank, index it, calibrate a first threshold.

A deterministic slice of the good images (``holdout_fraction``, chosen by a hash of the file name) is kept out
of the bank and used to set the initial pass/fail threshold at the configured false-reject rate, so a freshly
fitted model can make verdicts at once; ``lineinspect calibrate`` refines it on more good images.
Unreadable images are skipped with a warning; fitting fails only when no valid image is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.backbones import load_backbone
from models.features import PatchFeatureExtractor, flatten_patches
from models.images import ImageError, read_image
from models.index import NearestNeighbourIndex
from models.memory_bank import CompressedBankBuilder, MemoryBank, coreset_select
from models.scorer import Scorer, TrainingSummary, preprocess, resolve_device
from models.threshold import false_reject_threshold
from pipeline.config import Config

log = logging.getLogger(__name__)


def holdout_split(paths: Sequence[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    """``(fit, holdout)``: a file goes to holdout when the sha1 of its name falls in the first ``fraction``."""
    fit: list[Path] = []
    holdout: list[Path] = []
    for path in paths:
        bucket = int(hashlib.sha1(path.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (holdout if bucket < fraction else fit).append(path)
    if not fit:
        fit, holdout = list(holdout), []
    return fit, holdout


def _readable_batches(paths: Sequence[Path], batch_size: int, skipped: list[str]) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            batch.append(read_image(path))
        except ImageError as error:
            log.warning("skipping unreadable training image: %s", error)
            skipped.append(str(error))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_extractor(config: Config) -> PatchFeatureExtractor:
    settings = config.model
    backbone = load_backbone(settings.backbone, settings.layers, settings.weights_path)
    extractor = PatchFeatureExtractor(backbone, settings.aggregation_kernel, settings.feature_dim)
    return extractor.to(resolve_device(settings.device))


def fit_scorer(
    image_paths: Sequence[Path],
    config: Config,
    progress: bool = True,
    holdout_fraction: float = 0.1,
    source: str = "",
) -> Scorer:
    """Fit on good images; returns a Scorer with a threshold from the held-out slice (when there is one)."""
    started = time.perf_counter()
    if not image_paths:
        msg = "no training images given"
        raise ValueError(msg)
    fit_paths, holdout_paths = holdout_split(image_paths, holdout_fraction)
    extractor = build_extractor(config)
    device = next(extractor.backbone.buffers()).device
    channels, grid_h, grid_w = extractor.output_shape(config.model.image_size)
    patches_per_image = grid_h * grid_w
    skipped: list[str] = []
    batch_size = config.scoring.batch_size
    builder = CompressedBankBuilder(
        patches_per_image,
        config.bank.compression_ratio,
        config.bank.ema_momentum,
        config.bank.kmeans_iterations,
        config.bank.init_images,
        config.bank.seed,
    )
    collected: list[np.ndarray] = []
    bar = tqdm(total=len(fit_paths), desc="fit: embedding good images", unit="img", disable=not progress)
    used = 0
    for batch in _readable_batches(fit_paths, batch_size, skipped):
        with torch.inference_mode():
            features = extractor(preprocess(batch, config.model.image_size).to(device)).float().cpu()
        for image_features in features:
            patches = flatten_patches(image_features[None]).numpy()
            if config.bank.kind == "compressed":
                builder.add_image(patches)
            else:
                collected.append(patches)
        used += len(batch)
        bar.update(len(batch))
    bar.close()
    if used == 0:
        msg = f"no readable training image among {len(fit_paths)} files ({len(skipped)} skipped)"
        raise ValueError(msg)
    if config.bank.kind == "compressed":
        bank = builder.finish()
    else:
        all_patches = np.concatenate(collected)
        keep = max(1, int(np.ceil(config.bank.coreset_ratio * all_patches.shape[0])))
        coreset_bar = tqdm(total=keep, desc="fit: greedy coreset", unit="row", disable=not progress, miniters=256)
        chosen = coreset_select(all_patches, config.bank.coreset_ratio, config.bank.coreset_projection_dim,
                                config.bank.seed, on_step=lambda _step: coreset_bar.update(1))  # fmt: skip
        coreset_bar.close()
        bank = MemoryBank(np.ascontiguousarray(all_patches[chosen]), "coreset")
    use_gpu = config.index.use_gpu == "auto" and device.type == "cuda"
    index = NearestNeighbourIndex.build(
        bank.features, config.index.kind, use_gpu, config.index.ivf_lists, config.index.ivf_probe,
        config.index.hnsw_neighbors,
    )  # fmt: skip
    training = TrainingSummary(images=used, skipped=skipped, source=source)
    scorer = Scorer(extractor, bank, index, config.model, config.bank, config.index, config.scoring, training)
    if holdout_paths:
        good_scores = score_paths(scorer, holdout_paths, batch_size, progress, "fit: calibrating on held-out good",
                                  skipped)  # fmt: skip
        if good_scores.size:
            scorer.threshold = false_reject_threshold(good_scores, config.threshold.false_reject_rate)
    scorer.training = dataclasses.replace(training, fit_seconds=round(time.perf_counter() - started, 3))
    log.info("fitted %s bank of %d x %d from %d images in %.1f s", bank.kind, bank.rows, channels, used,
             time.perf_counter() - started)  # fmt: skip
    return scorer


def score_paths(
    scorer: Scorer,
    paths: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "scoring",
    skipped: list[str] | None = None,
) -> np.ndarray:
    """Image scores ``(readable images,)`` of image files; unreadable ones are warned about and added to ``skipped``."""
    scores: list[np.ndarray] = []
    skipped = [] if skipped is None else skipped
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    for batch in _readable_batches(paths, batch_size, skipped):
        scores.append(scorer.score(batch).scores)
        bar.update(len(batch))
    bar.close()
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)
