"""Tiled scoring of frames far from square (``[model] resize = "tile"``).

Stretching a 600 x 230 frame to the model's ``S x S`` square squeezes it 2.7x along its long side, so a 2 px crack
across that side shrinks below one pixel and the texture's scale differs from frame to frame. With tiling, a frame
of aspect ``a`` (long side / short side) is cut along its long side into ``k = round(a)`` (at least 1, at most
``MAX_TILES``) equal, adjacent pieces of aspect ``a / k`` (between 0.67 and 1.5 up to 8:1), and each piece is
stretched to the square on its own: the model sees every frame at close to one scale. Near-square frames
(``a < 1.5``) are one piece, as with stretching. The cap keeps a degenerate frame (a 1 x 5000 px line) from
costing thousands of backbone passes; frames beyond 8:1 get 8 longer pieces.

- ``tile_count(height, width)`` -> ``k``; ``frame_tiles(frame)`` -> the ``k`` pieces of an ``(H, W, C)`` frame.
- ``stitch_tiles(maps, shapes)``: ``(T, S, S)`` maps of the pieces (``T = sum k``, frames in order) ->
  ``(N, S, S)`` maps of the frames, each stretched to the square as with ``resize = "stretch"`` (piece ``j`` of ``k``
  fills the ``j``-th ``1/k`` of the long side), so heatmaps and masks keep their geometry whatever the mode.
- ``split_by_frame(values, shapes)``: the ``(T, ...)`` rows of each frame's pieces.

Fitting sees the pieces as training images, so memory banks and per-position statistics describe pieces; a piece's
edge inside the frame looks like a frame edge to the backbone, in training and in scoring alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_TILES = 8


def tile_count(height: int, width: int) -> int:
    """Pieces a ``height x width`` frame is cut into: its aspect (long / short side) rounded, 1 to ``MAX_TILES``."""
    return min(MAX_TILES, max(1, round(max(height, width) / max(1, min(height, width)))))


def _bounds(length: int, count: int) -> list[tuple[int, int]]:
    """``count`` adjacent ``[start, stop)`` ranges covering ``0 .. length``."""
    return [(round(i * length / count), round((i + 1) * length / count)) for i in range(count)]


def frame_tiles(frame: np.ndarray) -> list[np.ndarray]:
    """The ``tile_count`` pieces of an ``(H, W, ...)`` frame, along its long side (left to right or top to bottom)."""
    height, width = frame.shape[:2]
    count = tile_count(height, width)
    if width >= height:
        return [frame[:, start:stop] for start, stop in _bounds(width, count)]
    return [frame[start:stop] for start, stop in _bounds(height, count)]


def split_by_frame(values: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """``(T, ...)`` rows -> one ``(k, ...)`` tensor per frame, ``k = tile_count`` of its ``(height, width)``."""
    counts = [tile_count(height, width) for height, width in shapes]
    if sum(counts) != values.shape[0]:
        msg = f"{values.shape[0]} tiles for frames that make {sum(counts)}"
        raise ValueError(msg)
    return torch.split(values, counts)


def stitch_tiles(maps: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(T, S, S)`` piece maps -> ``(N, S, S)`` frame maps (each frame stretched to the square)."""
    size = maps.shape[-1]
    stitched = []
    for (height, width), pieces in zip(shapes, split_by_frame(maps, shapes), strict=True):
        if pieces.shape[0] == 1:
            stitched.append(pieces[0])
            continue
        wide = width >= height
        resized = [
            F.interpolate(piece[None, None], size=(size, stop - start) if wide else (stop - start, size),
                          mode="bilinear", align_corners=False)[0, 0]
            for piece, (start, stop) in zip(pieces, _bounds(size, pieces.shape[0]), strict=True)
        ]  # fmt: skip
        stitched.append(torch.cat(resized, dim=1 if wide else 0))
    return torch.stack(stitched)
