"""Heatmap overlay PNGs on disk with retention: at most ``max_files`` files, none older than ``max_age_s``.

``expired_files`` is the pure retention rule; ``HeatmapStore`` writes ``<dir>/<line>/<frame>@<frame entry id>.png``
and prunes. Ids become file names through ``safe_name``: an id of letters, digits, ``.``, ``_`` and ``-`` (not
starting with ``.``, at most ``NAME_CHARS`` long) is used as it is; any other id becomes a readable sanitised prefix
plus ``~`` and a hash of the exact id. Names are therefore unique per id, hold no path separator or ``..``, fit the
file-name limit, and every path stays inside the heatmap directory. The frame's
stream entry id in the name keeps two frames that reuse a frame_id from sharing (overwriting) one overlay.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
NAME_CHARS = 80  # readable part of a file name; with the hash and suffix well under the usual 255-byte limit
HASH_CHARS = 16


def safe_name(identifier: str) -> str:
    """A file name for ``identifier``: the id itself when it is safe, else a sanitised prefix + ``~`` + its hash.

    Safe ids never contain ``~``, hashed names always do, so two different ids never share a name.
    """
    cleaned = _UNSAFE.sub("_", identifier)
    if cleaned == identifier and identifier and not identifier.startswith(".") and len(identifier) <= NAME_CHARS:
        return identifier
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{cleaned.lstrip('.')[:NAME_CHARS]}~{digest}"


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

    def path_for(self, line_id: str, frame_id: str, frame_entry_id: str | None = None) -> Path:
        """The overlay's path for one frame (``frame_entry_id``: its frames-stream entry id, when known); always a
        file directly inside ``<directory>/<line>``, since ``safe_name`` gives no separator, ``.`` or ``..``."""
        name = safe_name(frame_id) if frame_entry_id is None else f"{safe_name(frame_id)}@{safe_name(frame_entry_id)}"
        return self.directory / safe_name(line_id) / f"{name}.png"

    def write(self, path: Path, image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None,
              score: float | None) -> Path:  # fmt: skip
        """Draw the overlay (``models.heatmap``: the frame with its map, verdict, score and colour scale) and write
        it to ``path`` (from ``path_for``); returns the path."""
        from models.heatmap import overlay_heatmap

        path.parent.mkdir(parents=True, exist_ok=True)
        overlay_bgr = overlay_heatmap(image_rgb, anomaly_map, threshold, score)
        partial = path.with_name(f".{path.stem}.tmp.png")  # no id's file name starts with "."
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
