"""Heatmap file names: safe, unique per id, bounded, always inside the heatmap directory (no Redis needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.heatmaps import HeatmapStore


@pytest.mark.parametrize(
    ("line_id", "frame_id"),
    [("..", "f1"), (".", "f1"), ("line-1", ".."), ("line-1", "../../escape"), ("../..", "/etc/passwd"), ("a/b", "x")],
)
def test_heatmap_paths_stay_inside_the_directory(tmp_path: Path, line_id: str, frame_id: str) -> None:
    root = tmp_path / "heatmaps"
    store = HeatmapStore(root, max_files=10, max_age_s=60)
    path = store.write(store.path_for(line_id, frame_id), np.zeros((16, 16, 3), np.uint8), np.ones((8, 8)), 0.5)
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
        store.write(store.path_for("line-1", frame_id), np.zeros((16, 16, 3), np.uint8), np.ones((8, 8)), 0.5)
    assert all(path.exists() for path in paths)
    assert sorted(tmp_path.rglob("*.png")) == sorted(paths)
