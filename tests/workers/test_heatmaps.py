"""Heatmap file names: safe, unique per id, bounded, always inside the heatmap directory (no Redis needed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.heatmap import FAIL_BGR, PASS_BGR, enlargement
from workers.heatmaps import HeatmapStore


@pytest.mark.parametrize(
    ("line_id", "frame_id"),
    [("..", "f1"), (".", "f1"), ("line-1", ".."), ("line-1", "../../escape"), ("../..", "/etc/passwd"), ("a/b", "x")],
)
def test_heatmap_paths_stay_inside_the_directory(tmp_path: Path, line_id: str, frame_id: str) -> None:
    root = tmp_path / "heatmaps"
    store = HeatmapStore(root, max_files=10, max_age_s=60)
    path = store.write(store.path_for(line_id, frame_id), np.zeros((16, 16, 3), np.uint8), np.ones((8, 8)), 0.5, 0.7)
    assert path.resolve().parent.parent == root.resolve()
    assert path.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]  # nothing written anywhere else


def test_heatmap_names_are_unique_per_id_and_fit_the_file_name_limit(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_files=100, max_age_s=60)
    frame_ids = ["cam1:0001", "cam1_0001", "cam1/0001", "x" * 300, "x" * 301, "é", "e", "x", "x.tmp", ".x", "_x"]
    paths = [store.path_for("line-1", frame_id) for frame_id in frame_ids]
    assert len(set(paths)) == len(frame_ids)
    assert all(len(path.name.encode()) <= 255 and "/" not in path.name for path in paths)
    assert store.path_for("line-1", "cam1-0001").name == "cam1-0001.png"  # plain ids stay readable
    assert store.path_for("line-1", "cam1:0001").name.startswith("cam1_0001~")
    for frame_id in frame_ids:  # a written overlay (or its partial file) never replaces another id's
        store.write(store.path_for("line-1", frame_id), np.zeros((16, 16, 3), np.uint8), np.ones((8, 8)), 0.5, 0.7)
    assert all(path.exists() for path in paths)
    assert sorted(tmp_path.rglob("*.png")) == sorted(paths)


def test_an_overlay_states_the_verdict_its_score_makes_at_the_threshold(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_files=10, max_age_s=60)
    frame, anomaly_map = np.full((64, 64, 3), 100, np.uint8), np.zeros((8, 8), np.float32)
    for score, shown, not_shown in ((5.5, FAIL_BGR, PASS_BGR), (4.5, PASS_BGR, FAIL_BGR)):
        overlay = cv2.imread(str(store.write(store.path_for("line-1", f"s{score}"), frame, anomaly_map, 5.0, score)))
        assert overlay is not None and overlay.shape[1] == 64 * enlargement(64, 64)
        caption = overlay[64 * enlargement(64, 64) :]
        headline = caption[: caption.shape[0] // 3]  # the verdict's row, above the colour bar
        assert (np.abs(headline.astype(int) - shown).max(axis=2) <= 40).sum() > 30
        assert not (np.abs(headline.astype(int) - not_shown).max(axis=2) <= 40).any()
