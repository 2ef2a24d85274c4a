"""Choosing between standardised and raw frames from the good images (``[model] intensity = "auto"``).

Standardising a frame (``models.scorer.preprocess``) sets its mean and standard deviation to fixed values. That is
right when good frames differ by exposure (the same surface captured brighter or darker: every pixel moved alike)
and wrong when they differ by content (more or less background in view): then a frame's mean and spread depend on
what it shows, and standardising moves the same material to a different level in each frame.

The good frames tell the two apart. Each sampled frame (downsized to ``SIDE`` px) gives its pixel values'
quantiles at ``LEVELS`` per channel, ``(F, L, C)``, as captured and after standardising it (then rescaled to the
frames' average mean and spread, so both are in the same units). For every level and channel: the spread (standard
deviation) of that quantile over the frames, raw and standardised, each plus ``NOISE_FLOOR``. Exposure drift
makes every level spread raw and standardising narrows them all; where content varies, some level that raw frames
hold steady (the pale background of a tissue slide) spreads once frames are standardised. Rule: standardise
unless standardising makes some level spread ``RAW_RATIO`` times or more than raw (ratios averaged over
channels). Levels where the raw frames sit at the clipping limits (saturated or black in most frames) are left
out: clipping, not content, holds them.

With an inspection mask (``models.inspection_mask``) the quantiles, means and spreads are taken over inspected pixels
only, as ``preprocess`` standardises: a lot code's dark print in the ignored region, at one grey level in every frame,
otherwise reads as a level raw frames hold steady and turns the choice to raw.

Measured on good frames (the largest ratio over levels): MTD 0.40 (seven exposures), gravel 0.79, a cup on a
fixture 0.44, tissue 2.65 (content varies), gravel and tissue under exposure drift 0.20 and 0.64. On validation
with synthetic defects (benchmarks/select_defaults.py) raw frames won on tissue alone (summed +21 image / +26 pixel
AUROC) and lost on tissue under drift (-12 pixel): the rule picks the winner on each, and standardise where the two
tie (benchmarks/RESULTS.md section 4, sessions 12 and 13).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.images import read_sample, to_unit_range
from models.inspection_mask import InspectionMask
from pipeline.config import Intensity

SIDE = 64  # frames are downsized to SIDE x SIDE before their quantiles are taken
LEVELS = np.linspace(0.05, 0.95, 10)  # quantile levels compared
NOISE_FLOOR = 1.0 / 255.0  # added to every spread: one grey level, so steady levels' ratios stay meaningful
RAW_RATIO = 1.5  # standardised spread / raw spread at which raw frames are chosen; margin for sampling noise
MAX_FRAMES = 256  # frames sampled (evenly) from the good images
MIN_FRAMES = 8  # fewer readable frames: standardise (the robust choice), saying why
CLIPPED = (2.0 / 255.0, 253.0 / 255.0)  # raw quantiles at or beyond these in most frames are clipped


@dataclass(frozen=True)
class IntensityChoice:
    """``intensity`` ("raw" or "standardise"), the ratio that decided it and where, and one line for people."""

    intensity: Intensity
    ratio: float
    level: float
    frames: int

    def describe(self) -> str:
        if self.frames < MIN_FRAMES:
            return f"auto: standardise (only {self.frames} readable good frames to compare; {MIN_FRAMES} needed)"
        measured = (f"standardising spreads the good frames' {self.level:.0%} intensity level {self.ratio:.2f}x as "
                    f"much as raw, over {self.frames} frames")  # fmt: skip
        if self.intensity == "raw":
            return f"auto: raw ({measured}: their content varies, not only their exposure; {RAW_RATIO}x chooses raw)"
        return f"auto: standardise ({measured}, the most of any level; {RAW_RATIO}x would choose raw)"


def level_quantiles(image: np.ndarray, inspected: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """``(H, W, C)`` uint8 or uint16 -> its ``(L, C)`` quantiles in [0, 1] of its own range (``full_scale``: 10- or
    12-bit data in 16 bits keeps its grey levels against ``NOISE_FLOOR`` and ``CLIPPED``) at ``LEVELS``, and its
    mean and spread (over all channels, as ``preprocess`` standardises); over the ``inspected`` pixels ``(SIDE,
    SIDE)`` bool only, when given."""
    small = to_unit_range(cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA), image)
    pixels = small.reshape(SIDE * SIDE, -1) if inspected is None else small[inspected].reshape(-1, small.shape[-1])
    return np.quantile(pixels, LEVELS, axis=0), float(pixels.mean()), max(float(pixels.std()), 1.0 / 255.0)


def spread_ratios(quantiles: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """``(F, L, C)`` raw quantiles with each frame's mean and spread ``(F,)`` -> ``(L,)`` standardised / raw spread
    over frames (channels averaged; NaN where the raw level is clipped)."""
    standardised = (quantiles - means[:, None, None]) / stds[:, None, None] * stds.mean() + means.mean()
    raw_spread = quantiles.std(axis=0) + NOISE_FLOOR
    standard_spread = standardised.std(axis=0) + NOISE_FLOOR
    median = np.median(quantiles, axis=0)
    clipped = (median <= CLIPPED[0]) | (median >= CLIPPED[1])
    kept = (~clipped).sum(axis=1)
    summed = np.where(clipped, 0.0, standard_spread / raw_spread).sum(axis=1)
    return np.where(kept > 0, summed / np.maximum(kept, 1), np.nan)


def choose_intensity_from(images: Sequence[np.ndarray], mask: InspectionMask | None = None) -> IntensityChoice:
    """The choice for RGB uint8 frames (any sizes), on the pixels an inspection ``mask`` inspects."""
    if len(images) < MIN_FRAMES:
        return IntensityChoice("standardise", float("nan"), float("nan"), len(images))
    inspected = None
    if mask is not None:  # pixels mostly inspected, or where none is at SIDE px (a thin band), any partly inspected
        shares = mask.at(SIDE, SIDE)
        inspected = shares > 0.5 if (shares > 0.5).any() else shares > 0
    stats = [level_quantiles(image, inspected) for image in images]
    quantiles = np.stack([quantile for quantile, _, _ in stats])
    means = np.array([mean for _, mean, _ in stats])
    stds = np.array([std for _, _, std in stats])
    ratios = spread_ratios(quantiles, means, stds)
    if np.isnan(ratios).all():
        return IntensityChoice("standardise", float("nan"), float("nan"), len(images))
    worst = int(np.nanargmax(ratios))
    intensity: Intensity = "raw" if ratios[worst] >= RAW_RATIO else "standardise"
    return IntensityChoice(intensity, float(ratios[worst]), float(LEVELS[worst]), len(images))


def choose_intensity(paths: Sequence[Path], mask: InspectionMask | None = None) -> IntensityChoice:
    """The choice for good image files: up to ``MAX_FRAMES`` of them, evenly spaced; unreadable ones are passed
    over (the fit reports them)."""
    return choose_intensity_from(read_sample(paths, MAX_FRAMES, keep_depth=True), mask)
