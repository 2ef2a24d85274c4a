"""Heatmap overlays an operator can read.

``overlay_heatmap(image_rgb (H, W, 3), anomaly_map (h, w), threshold)`` -> BGR uint8 ``(H, W, 3)`` for
``cv2.imwrite``: the map is resized to the image, scaled so that the threshold sits at the middle of the colour
scale (green-blue below, yellow-red above; a fixed scale, so frames near the threshold are comparable), blended
over the frame, and regions above the threshold are outlined in white. A map reaching beyond twice the threshold
is scaled by its own maximum instead, so its worst region stands out in red even where a defect lifts the whole
frame above the threshold (large defects do, most with registered parts: RESULTS.md section 4, session 13).
Without a threshold the map is scaled by its maximum.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.images import to_rgb, to_uint8_of_own_range


def overlay_heatmap(
    image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, alpha: float = 0.45
) -> np.ndarray:
    image = to_uint8_of_own_range(to_rgb(image_rgb))  # 12-bit data in 16 bits is not shown near black
    height, width = image.shape[:2]
    resized = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    peak = float(resized.max())
    scale = max(2.0 * threshold, peak) if threshold and threshold > 0 else peak or 1.0
    levels = np.clip(resized / scale * 255.0, 0, 255).astype(np.uint8)
    colours = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    frame_bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    blended = cv2.addWeighted(colours, alpha, frame_bgr, 1.0 - alpha, 0.0)
    if threshold is not None:
        above = (resized > threshold).astype(np.uint8)
        contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), max(1, min(height, width) // 200))
    return blended
