"""N-pad image shifting: score every image at a few small translations and keep the per-pixel minimum.

A slightly misaligned good part produces high patch distances only where its features do not line up with the
bank; at one of a few nearby translations they do. ``shift_offsets(pixels, pattern)`` lists the ``(dx, dy)``
offsets (the unshifted view first), ``shifted_views(images, offsets)`` turns ``(batch, 3, H, W)`` into
``(batch * views, 3, H, W)`` (view-major within each image, so one backbone call covers all shifts of all
frames), and ``align_and_aggregate(maps, offsets, how)`` moves each view's ``(batch * views, H, W)`` map back
into the original image's coordinates and reduces it to ``(batch, H, W)``.
Borders uncovered by a shift are filled by replicating the edge.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def shift_offsets(pixels: int, pattern: Literal["cross", "grid"] = "cross") -> list[tuple[int, int]]:
    """``[(0, 0), ...]``: cross = the 4 axis shifts; grid = all 8 neighbours at distance ``pixels``."""
    if pixels < 0:
        msg = f"shift pixels must be >= 0, got {pixels}"
        raise ValueError(msg)
    if pixels == 0:
        return [(0, 0)]
    if pattern == "cross":
        return [(0, 0), (pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels)]
    if pattern == "grid":
        steps = (-pixels, 0, pixels)
        return [(0, 0)] + [(dx, dy) for dy in steps for dx in steps if (dx, dy) != (0, 0)]
    msg = f"unknown shift pattern {pattern!r}; use cross or grid"
    raise ValueError(msg)


def translate(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move content of ``(..., H, W)`` by ``dx`` right and ``dy`` down, replicating the edge into the gap."""
    if dx == 0 and dy == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]


def shifted_views(images: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """``(batch, 3, H, W)`` -> ``(batch * views, 3, H, W)`` with views of one image adjacent."""
    if offsets == [(0, 0)]:
        return images
    views = torch.stack([translate(images, dx, dy) for dx, dy in offsets], dim=1)
    return views.reshape(-1, *images.shape[1:])


def align_and_aggregate(
    maps: torch.Tensor, offsets: list[tuple[int, int]], how: Literal["min", "mean"] = "min"
) -> torch.Tensor:
    """``(batch * views, H, W)`` maps of shifted views -> ``(batch, H, W)`` in original coordinates."""
    views = len(offsets)
    if views == 1:
        return maps
    grouped = maps.reshape(-1, views, *maps.shape[-2:])
    aligned = torch.stack(
        [translate(grouped[:, v : v + 1], -dx, -dy)[:, 0] for v, (dx, dy) in enumerate(offsets)], dim=1
    )
    return aligned.amin(dim=1) if how == "min" else aligned.mean(dim=1)
