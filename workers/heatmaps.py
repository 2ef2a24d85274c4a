"""Heatmap overlay PNGs on disk with retention: at most ``max_files`` files, none older than ``max_age_s``.

``expired_files`` is the pure retention rule; ``HeatmapStore`` writes ``<dir>/<line>/<frame_id>.png`` and prunes.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def expired_files(files: Sequence[tuple[Path, float]], now: float, max_files: int, max_age_s: float) -> list[Path]:
    """Files (path, mtime) to delete: everything older than ``max_age_s``, then the oldest beyond ``max_files``."""
    newest_first = sorted(files, key=lambda item: item[1], reverse=True)
    fresh = [path for path, mtime in newest_first if now - mtime <= max_age_s]
    too_old = [path for path, mtime in newest_first if now - mtime > max_age_s]
    return too_old + fresh[max_files:]


class HeatmapStore:
    """Writes overlays for a sink and keeps the directory within its retention limits."""

    def __init__(self, directory: Path, max_files: int, max_age_s: float, prune_every_s: float = 10.0) -> None:
        self.directory = directory
        self.max_files = max_files
        self.max_age_s = max_age_s
        self.prune_every_s = prune_every_s
        self._next_prune = 0.0

    def path_for(self, line_id: str, frame_id: str) -> Path:
        return self.directory / _UNSAFE.sub("_", line_id) / f"{_UNSAFE.sub('_', frame_id)}.png"

    def write(
        self, line_id: str, frame_id: str, image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None
    ) -> Path:
        """Draw the overlay (``models.heatmap``) and write it; returns the file path."""
        from models.heatmap import overlay_heatmap

        path = self.path_for(line_id, frame_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        overlay_bgr = overlay_heatmap(image_rgb, anomaly_map, threshold)
        partial = path.with_suffix(".tmp.png")
        if not cv2.imwrite(str(partial), overlay_bgr):
            msg = f"could not write heatmap {partial}: check that sink.heatmap_dir is writable"
            raise OSError(msg)
        partial.replace(path)
        return path

    def maybe_prune(self, now_monotonic: float | None = None) -> int:
        """Apply retention at most every ``prune_every_s``; returns how many files were deleted."""
        now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
        if now_monotonic < self._next_prune or not self.directory.exists():
            return 0
        self._next_prune = now_monotonic + self.prune_every_s
        files = [(path, path.stat().st_mtime) for path in self.directory.rglob("*.png")]
        doomed = expired_files(files, time.time(), self.max_files, self.max_age_s)
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            logger.info("heatmap retention pruned files", extra={"deleted": len(doomed)})
        return len(doomed)
