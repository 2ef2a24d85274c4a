"""Per-position normalisation of anomaly maps, learnt from good images the method never saw.

A method's raw map is not equally noisy everywhere: image borders, part edges and fixture shadows vary more among
good parts than flat surfaces do, so with one threshold on raw maps the noisiest positions decide both the false
rejects and how faint a defect elsewhere may be. Fit scores a slice of good images kept out of the method's
training and keeps, per pixel, the mean and standard deviation of their (unsmoothed) maps; scoring then reports

    z(y, x) = (map(y, x) - mean(y, x)) / std(y, x)

so every position is measured against its own spread among good parts. With few held-out images the per-pixel
estimates are shrunk towards the image-wide ones (``prior_images`` pseudo-images of the global mean/variance):
on a line of unaligned parts (textures) the statistics come out flat and z is a global rescaling.

Shapes: maps ``(N, S, S)`` at the model's image size; ``mean`` and ``std`` ``(S, S)`` float32. Fitting keeps only
running float64 sums ``(S, S)`` (``PositionStatsBuilder``), so its memory does not grow with the slice.
Saved as ``position_stats.npz`` (two arrays, read back with ``allow_pickle=False``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.errors import ArtifactError

log = logging.getLogger(__name__)
STATS_FILE = "position_stats.npz"
MIN_STD_FRACTION = 1e-3  # floor on std, relative to the image-wide std: a constant pixel cannot divide by zero


@dataclass(frozen=True)
class PositionStats:
    mean: torch.Tensor  # (S, S)
    std: torch.Tensor  # (S, S)
    images: int

    @classmethod
    def from_maps(cls, maps: torch.Tensor, prior_images: float) -> PositionStats:
        """Statistics of good images' raw maps ``(N, S, S)`` (all in memory; fitting streams them instead)."""
        builder = PositionStatsBuilder()
        builder.add(maps)
        return builder.finish(prior_images)

    @property
    def image_size(self) -> int:
        return int(self.mean.shape[-1])

    def apply(self, maps: torch.Tensor) -> torch.Tensor:
        """Raw maps ``(N, S, S)`` -> z-scores ``(N, S, S)``."""
        if maps.shape[-2:] != self.mean.shape:
            msg = f"maps of size {tuple(maps.shape[-2:])} cannot use position statistics of {tuple(self.mean.shape)}"
            raise ValueError(msg)
        return (maps - self.mean.to(maps.device)) / self.std.to(maps.device)

    def save(self, model_dir: Path) -> str:
        np.savez(model_dir / STATS_FILE, mean=self.mean.numpy(), std=self.std.numpy())
        return STATS_FILE

    @classmethod
    def load(cls, model_dir: Path, images: int, image_size: int) -> PositionStats:
        path = model_dir / STATS_FILE
        try:
            with np.load(path, allow_pickle=False) as arrays:
                mean, std = arrays["mean"], arrays["std"]
        except (OSError, KeyError, ValueError) as error:
            msg = f"{path}: unreadable position statistics ({error})"
            raise ArtifactError(msg) from None
        expected = (image_size, image_size)
        if mean.shape != expected or std.shape != expected or not (np.isfinite(mean).all() and (std > 0).all()):
            msg = f"{path}: position statistics must be finite {expected} maps with std > 0, got {mean.shape}"
            raise ArtifactError(msg)
        return cls(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32)), images)


class PositionStatsBuilder:
    """Running per-pixel sums of good maps; ``finish`` shrinks the per-pixel mean and variance towards the
    image-wide ones with a weight of ``prior_images`` pseudo-images."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._sum_squares: torch.Tensor | None = None

    def add(self, maps: torch.Tensor) -> None:
        if maps.ndim != 3 or maps.shape[0] < 1:
            msg = f"position statistics need maps (N >= 1, S, S), got shape {tuple(maps.shape)}"
            raise ValueError(msg)
        maps = maps.detach().to("cpu", torch.float64)
        if self._sum is None or self._sum_squares is None:
            self._sum, self._sum_squares = maps.sum(dim=0), maps.square().sum(dim=0)
        elif maps.shape[1:] != self._sum.shape:
            msg = f"maps of size {tuple(maps.shape[1:])} after maps of size {tuple(self._sum.shape)}"
            raise ValueError(msg)
        else:
            self._sum += maps.sum(dim=0)
            self._sum_squares += maps.square().sum(dim=0)
        self.count += maps.shape[0]

    def finish(self, prior_images: float) -> PositionStats:
        if self._sum is None or self._sum_squares is None:
            msg = "no maps were added"
            raise ValueError(msg)
        mean = self._sum / self.count
        variance = (self._sum_squares / self.count - mean.square()).clamp_min(0.0)
        unvarying = float((variance <= 1e-10 * (1.0 + mean.square())).float().mean())
        if self.count > 1 and unvarying > 0.5:
            log.warning("the %d held-out good images give the same anomaly map at %.0f%% of pixels (identical or "
                        "blank images?): scores will be extreme for anything else; fit on good images that vary as "
                        "production frames do", self.count, 100 * unvarying)  # fmt: skip
        global_mean = mean.mean()
        global_variance = (self._sum_squares.mean() / self.count - global_mean.square()).clamp_min(0.0)
        weight = self.count / (self.count + prior_images)
        mean = weight * mean + (1 - weight) * global_mean
        variance = weight * variance + (1 - weight) * global_variance
        floor = MIN_STD_FRACTION * float(global_variance.sqrt()) + 1e-12
        return PositionStats(mean.float(), variance.sqrt().clamp_min(floor).float(), self.count)
