"""Hand-made "backbone" of local pixel statistics: what a frame looks like cell by cell, without ImageNet features.

``PixelStatistics()(images)`` takes a normalised batch ``(batch, 3, H, W)`` (frames standardised to unit spread);
each stage pools it over its own cells and returns ``(batch, 7, H / s, W / s)``: per colour channel the cell's mean
and standard deviation, and the cell's mean gradient magnitude (Sobel on the channel mean). Stages ``cells8``,
``cells16`` and ``cells32`` use cells of 8, 16 and 32 px. A per-position method over these (PaDiM) models each
position's brightness, colour, contrast and edge energy among good parts: large low-contrast stains and uneven
areas, which ImageNet features see as texture much like their surroundings, change exactly these. Nothing is
learnt here, so there are no weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Per-position spreads among standardised good frames (MTD training tiles, 8-px cells): means 0.5, deviations 0.12,
# gradients 0.07. The gains bring all three to about 0.5, so a per-position Gaussian's fixed ridge (PaDiM's 0.01)
# weighs on every statistic alike instead of drowning the small ones.
DEVIATION_GAIN, GRADIENT_GAIN = 4.0, 8.0
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


class CellStatistics(nn.Module):
    """``(batch, 3, H, W)`` -> ``(batch, 7, H / cell, W / cell)``: channel means, channel deviations, gradient."""

    def __init__(self, cell: int) -> None:
        super().__init__()
        self.cell = cell
        self.register_buffer("sobel", torch.stack([_SOBEL_X, _SOBEL_X.T])[:, None])  # (2, 1, 3, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cell = self.cell
        images = images.contiguous()
        mean = F.avg_pool2d(images, cell, cell, ceil_mode=True)
        square = F.avg_pool2d(images * images, cell, cell, ceil_mode=True)
        deviation = (square - mean * mean).clamp_min(0.0).sqrt()
        sobel = self.sobel
        assert isinstance(sobel, torch.Tensor)
        gradients = F.conv2d(images.mean(dim=1, keepdim=True), sobel.to(images.dtype), padding=1)
        magnitude = F.avg_pool2d(gradients.square().sum(dim=1, keepdim=True).sqrt(), cell, cell, ceil_mode=True)
        return torch.cat([mean, DEVIATION_GAIN * deviation, GRADIENT_GAIN * magnitude], dim=1)


class PixelStatistics(nn.Module):
    """Stages ``cells8``, ``cells16``, ``cells32``, each fed the image itself (tapped by ``Backbone``'s hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells8 = CellStatistics(8)
        self.cells16 = CellStatistics(16)
        self.cells32 = CellStatistics(32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        finest = self.cells8(images)
        self.cells16(images)
        self.cells32(images)
        return finest
