"""N-pad image shifting: score every image at a few small translations and keep the per-pixel minimum.

A slightly misaligned good part produces high patch distances only where its features do not line up with the
bank; at one of a few nearby translations they do. ``shift_offsets(pixels, pattern)`` lists the ``(dx, dy)``
offsets (the unshifted view first), ``shifted_views(images, offsets)`` turns ``(batch, 3, H, W)`` into
``(batch * views, 3, H, W)`` (view-major within each image, so one backbone call covers all shifts of all
frames), and ``align_and_aggregate(maps, offsets, how)`` moves each view's ``(batch * views, H, W)`` map back
into the original image's coordinates and reduces it to ``(batch, H, W)``: a view shifted by ``+d`` is moved back
by ``-d``, and each pixel is reduced over the views whose content held it (a view shifted by ``+d`` lost the
``d`` pixels along one border; the unshifted view holds every pixel). ``aggregate_view_scores`` reduces the
views' image scores ``(batch * views,)`` to ``(batch,)``. The gap a shift opens in a view is filled by
replicating the edge.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=16)
def held_pixels(height: int, width: int, offsets: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """``(views, H, W)`` bool: whether the view shifted by ``(dx, dy)`` shows pixel ``(y, x)`` of the original
    image, i.e. ``(y + dy, x + dx)`` lies in the frame. Built once per map size and offsets (read-only: shared by
    every batch); offsets that leave a pixel in no view are a ValueError."""
    rows = torch.arange(height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    held = torch.stack([(rows + dy >= 0) & (rows + dy < height) & (columns + dx >= 0) & (columns + dx < width)
                        for dx, dy in offsets])  # fmt: skip
    if not held.any(dim=0).all():
        msg = f"shift offsets {list(offsets)} leave pixels of a {height}x{width} map in no view: include (0, 0)"
        raise ValueError(msg)
    return held


def align_and_aggregate(
    maps: torch.Tensor, offsets: list[tuple[int, int]], how: Literal["min", "mean"] = "min"
) -> torch.Tensor:
    """``(batch * views, H, W)`` maps of shifted views -> ``(batch, H, W)`` in original coordinates, each pixel
    the min or mean over the views that held it."""
    views = len(offsets)
    if views == 1:
        return maps
    height, width = maps.shape[-2:]
    grouped = maps.reshape(-1, views, height, width)
    aligned = torch.stack(
        [translate(grouped[:, v : v + 1], -dx, -dy)[:, 0] for v, (dx, dy) in enumerate(offsets)], dim=1
    )
    held = held_pixels(height, width, tuple(offsets), maps.device)
    if how == "min":
        return aligned.masked_fill(~held, torch.inf).amin(dim=1)
    return (aligned * held).sum(dim=1) / held.sum(dim=0)


def aggregate_view_scores(
    scores: torch.Tensor, offsets: list[tuple[int, int]], how: Literal["min", "mean"] = "min"
) -> torch.Tensor:
    """``(batch * views,)`` image scores of shifted views -> ``(batch,)``, min or mean over each image's views."""
    grouped = scores.reshape(-1, len(offsets))
    return grouped.amin(dim=1) if how == "min" else grouped.mean(dim=1)
