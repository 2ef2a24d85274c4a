"""Heatmap overlays (models/heatmap.py): a fixed colour scale near the threshold, a frame's own beyond it."""

from __future__ import annotations

import cv2
import numpy as np

from models.heatmap import overlay_heatmap

GREY = np.full((32, 32, 3), 128, np.uint8)


def expected_colour(level: float) -> np.ndarray:
    """The blended BGR colour of a map pixel at ``level`` (0-255 of the colour scale) over the grey frame."""
    jet = cv2.applyColorMap(np.array([[int(level)]], np.uint8), cv2.COLORMAP_JET)[0, 0].astype(float)
    return np.round(0.45 * jet + 0.55 * 128)


def test_maps_near_the_threshold_share_one_scale_with_the_threshold_mid_way() -> None:
    threshold = 4.0
    at_threshold = overlay_heatmap(GREY, np.full((8, 8), threshold, np.float32), threshold)
    below = overlay_heatmap(GREY, np.full((8, 8), 0.5 * threshold, np.float32), threshold)
    np.testing.assert_allclose(at_threshold[4, 4], expected_colour(127), atol=2)
    np.testing.assert_allclose(below[16, 16], expected_colour(63), atol=2)


def test_a_map_far_above_the_threshold_is_scaled_by_its_own_peak() -> None:
    threshold = 4.0
    lifted = np.full((32, 32), 1.5 * threshold, np.float32)  # a defect lifting the whole frame above threshold
    lifted[14:18, 14:18] = 40 * threshold
    overlay = overlay_heatmap(GREY, lifted, threshold)
    np.testing.assert_allclose(overlay[2, 2], expected_colour(1.5 / 40 * 255), atol=2)  # the background: blue
    np.testing.assert_allclose(overlay[15, 15], expected_colour(255), atol=2)  # the defect: red
