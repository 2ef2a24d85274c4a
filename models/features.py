"""Locally aware patch features from a frozen backbone (PatchCore's recipe).

``PatchFeatureExtractor(images)`` takes ``(batch, 3, height, width)`` floats in [0, 1] and returns
``(batch, channels, grid_h, grid_w)``: each tapped map averaged over its ``k x k`` neighbourhood, the deeper maps
bilinearly upsampled to the shallowest map's grid (stride 8 for the default layers), concatenated along channels,
and optionally reduced to ``feature_dim`` channels by averaging groups of neighbouring channels (no state to fit,
so nothing extra to save).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Backbone


class PatchFeatureExtractor(nn.Module):
    def __init__(self, backbone: Backbone, aggregation_kernel: int = 3, feature_dim: int | None = None) -> None:
        super().__init__()
        if aggregation_kernel < 1 or aggregation_kernel % 2 == 0:
            msg = f"aggregation_kernel must be a positive odd number, got {aggregation_kernel}"
            raise ValueError(msg)
        self.backbone = backbone
        self.aggregation_kernel = aggregation_kernel
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        kernel = self.aggregation_kernel
        if kernel > 1:
            maps = [F.avg_pool2d(m, kernel, stride=1, padding=kernel // 2, count_include_pad=False) for m in maps]
        grid = maps[0].shape[-2:]
        upsampled = [maps[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]]
        features = torch.cat(upsampled, dim=1)
        if self.feature_dim is not None and self.feature_dim < features.shape[1]:
            batch, channels, height, width = features.shape
            flat = features.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            features = (
                F.adaptive_avg_pool1d(flat, self.feature_dim).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
            )
        return features.float()

    @torch.inference_mode()
    def output_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(channels, grid_h, grid_w)`` for square inputs of ``image_size``; runs one small forward pass."""
        device = next(self.backbone.buffers()).device
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        channels, height, width = self(probe).shape[1:]
        return int(channels), int(height), int(width)


@torch.inference_mode()
def embed_on_device(extractor: PatchFeatureExtractor, views: torch.Tensor) -> torch.Tensor:
    """``(V, 3, S, S)`` -> ``(V, C, h, w)`` float32 on the extractor's device (fp16 autocast on CUDA)."""
    device = next(extractor.backbone.buffers()).device
    views = views.to(device, non_blocking=True)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            return extractor(views).float()
    return extractor(views)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """``(batch, channels, h, w)`` -> ``(batch * h * w, channels)``, row-major over (batch, h, w)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
