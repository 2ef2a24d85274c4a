"""Heatmap overlays an operator can read.

``overlay_heatmap(image_rgb (H, W, 3) or (H, W), anomaly_map (h, w), threshold, score, defect_mask (H, W) | None)``
-> BGR uint8 ``(k * H + caption, max(k * W, MIN_WIDTH), 3)`` for ``cv2.imwrite``: the frame (enlarged by a whole
factor ``k`` when narrower than ``MIN_WIDTH``, so the caption is legible on MTD's 105-px tiles) with the map blended
over it, and a caption band below it that covers nothing of the part. Enlarging stops at ``MAX_ENLARGED_PIXELS``;
a frame still narrower than ``MIN_WIDTH`` is padded to it on the right, and one far taller than wide (more than
``MAX_ENLARGED_PIXELS / MIN_WIDTH`` rows) is drawn without a caption, so an overlay costs about what its frame does.

The colour scale is fixed in units of the threshold, the same for every frame of a model, so the same map value
always gets the same colour (it used to be stretched to a frame's own peak beyond twice the threshold, which painted
the regions above the threshold of a frame with a high peak blue): 0 to the threshold runs linearly over the lower
half of the jet colours (blue, cyan, green), the threshold to ``SCALE_TOP`` times it logarithmically over the upper
half (yellow, orange, red), so a defect lifting the whole frame just above the threshold (yellow) still shows its
worst region hotter. The colours are transparent at 0 and grow opaque towards the threshold: a frame well under it
shows the part as it is. Regions above the threshold are outlined in white; a defect mask, when given (evaluate's
report), in magenta. The caption states the verdict (fail = score above the threshold, as ``Scorer.verdicts``), the
score, a colour bar with the threshold marked in white and what each outline means. Without a threshold the map is
scaled by its own maximum, and the caption says so.

Cost per frame: the scale and transparency are computed on the ``(h, w)`` map and resized once, so drawing costs
a resize, a colour lookup and a blend over the frame's pixels, plus the caption's text.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from models.images import to_rgb, to_uint8_of_own_range

MIN_WIDTH = 256  # narrower frames are enlarged by a whole factor, pixels kept (nearest neighbour)
# Enlarging (and padding to MIN_WIDTH) stops at this many pixels, a 2048 x 2048 frame: unbounded, an 8 x 60000 frame
# became 256 x 1.9 million pixels, 11 GB and 26 s in the sink
MAX_ENLARGED_PIXELS = 2**22
SCALE_TOP = 16.0  # the colour scale ends at this many thresholds (MTD's defects reach 2-4, the demo's 30-50)
OPACITY = 0.5  # of the colours at and above the threshold
THRESHOLD_LEVEL = 0.5  # the threshold's place on the colour scale
MASK_BGR = (255, 0, 255)  # magenta: in no jet colour
FAIL_BGR, PASS_BGR, UNKNOWN_BGR = (60, 60, 255), (90, 220, 90), (200, 200, 200)
BAND_BGR = (32, 32, 32)
TEXT_BGR = (235, 235, 235)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def enlargement(height: int, width: int) -> int:
    """The whole factor a ``height x width`` frame is enlarged by in its overlay: up to the one making it
    ``MIN_WIDTH`` wide, as far as its picture (padded to ``MIN_WIDTH`` wide) stays within ``MAX_ENLARGED_PIXELS``;
    1 from ``MIN_WIDTH`` up."""
    factor = max(1, math.ceil(MIN_WIDTH / max(width, 1)))
    while factor > 1 and max(factor * width, MIN_WIDTH) * factor * height > MAX_ENLARGED_PIXELS:
        factor -= 1
    return factor


def colour_levels(anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """Each map value's place on the colour scale, float32 in [0, 1] (see the module docstring); without a positive
    threshold, the value over the map's own maximum. NaN (a fault) is put at the top, where it is seen."""
    values = anomaly_map.astype(np.float32)
    if threshold is None or threshold <= 0:
        finite = values[np.isfinite(values)]
        peak = float(finite.max()) if finite.size else 0.0
        levels = values / np.float32(peak) if peak > 0 else np.zeros_like(values)
    else:
        ratio = values / np.float32(threshold)
        above = np.log(np.clip(ratio, 1.0, SCALE_TOP)) / np.float32(math.log(SCALE_TOP))
        levels = np.where(ratio <= 1.0, THRESHOLD_LEVEL * ratio, THRESHOLD_LEVEL + (1 - THRESHOLD_LEVEL) * above)
    return np.clip(np.nan_to_num(levels, nan=1.0), 0.0, 1.0).astype(np.float32)


def overlay_heatmap(image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None, score: float | None,
                    defect_mask: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    image = to_uint8_of_own_range(to_rgb(image_rgb))  # 12-bit data in 16 bits is not shown near black
    factor = enlargement(*image.shape[:2])
    if factor > 1:
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    height, width = image.shape[:2]
    with_threshold = threshold is not None and threshold > 0
    map_levels = colour_levels(anomaly_map, threshold)
    map_opacity = (OPACITY * np.clip(map_levels / THRESHOLD_LEVEL, 0.0, 1.0)).astype(np.float32)
    levels = cv2.resize(map_levels, (width, height), interpolation=cv2.INTER_LINEAR)
    opacity = cv2.resize(map_opacity, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.round(levels * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    frame_bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    picture = cv2.blendLinear(colours, frame_bgr, opacity, 1.0 - opacity)
    line = max(1, min(height, width) // 200)
    if with_threshold:
        above = (levels > THRESHOLD_LEVEL).astype(np.uint8)
        contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, (255, 255, 255), line)
    if defect_mask is not None and defect_mask.any():
        mask = cv2.resize(defect_mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(picture, contours, -1, MASK_BGR, max(2, line))
    if width < MIN_WIDTH:  # enlarging stopped short of it
        if MIN_WIDTH * height > MAX_ENLARGED_PIXELS:
            return picture  # far taller than wide: no room for a legible caption within the budget
        picture = cv2.copyMakeBorder(picture, 0, 0, 0, MIN_WIDTH - width, cv2.BORDER_CONSTANT, value=BAND_BGR)
    with_mask = defect_mask is not None and bool(defect_mask.any())
    caption = _caption(picture.shape[1], min(picture.shape[:2]), threshold if with_threshold else None, score,
                       float(anomaly_map.max()), with_mask)  # fmt: skip
    return np.vstack([picture, caption])


def _text_width(text: str, scale: float = 1.0) -> int:
    return int(cv2.getTextSize(text, FONT, scale, 1)[0][0])


def _text_scale(line_widths: list[float], width: int, side: int, margin: int) -> float:
    """A font scale of about ``side / 1000``, ``side`` the picture's shorter side (at least 0.45: legible on a 256-px
    overlay; in proportion on large frames, not growing with a line-scan frame's width), smaller where a line
    (``line_widths``: its width at scale 1) would not fit inside the margins."""
    return min(max(0.45, side / 1000), 0.95 * (width - 2 * margin) / max(line_widths))


def _caption(width: int, side: int, threshold: float | None, score: float | None, peak: float,
             with_mask: bool) -> np.ndarray:  # fmt: skip
    """The band under a picture ``width`` wide, its shorter side ``side``: verdict and score; a colour bar with its
    ends and the threshold labelled; what the outlines mean."""
    margin = max(4, width // 50)
    if score is None:
        verdict, colour = "NO SCORE", UNKNOWN_BGR
    elif threshold is None:
        verdict, colour = "NO THRESHOLD", UNKNOWN_BGR
    else:
        verdict, colour = ("FAIL", FAIL_BGR) if score > threshold else ("PASS", PASS_BGR)
    if threshold is None:
        ticks = [(0.0, "0"), (1.0, f"map max {peak:.2f}")]
    else:
        ticks = [(0.0, "0"), (THRESHOLD_LEVEL, f"threshold {threshold:.2f}"), (1.0, f"{SCALE_TOP * threshold:.3g}")]
    legend = [("above threshold", (255, 255, 255))] * (threshold is not None) + [("defect mask", MASK_BGR)] * with_mask
    score_text = "" if score is None else f"score {score:.2f}"
    longer_end = max(ticks[0][1], ticks[-1][1], key=len)  # the middle label is centred: room for the longer end twice
    tick_line = "  ".join([longer_end, ticks[1][1], longer_end] if threshold is not None else [t for _, t in ticks])
    headline = 1.4 * _text_width(f"{verdict}  ") + _text_width(score_text)  # the verdict is written 1.4 times larger
    legend_width = _text_width("   ".join(text for text, _ in legend))
    scale = _text_scale([headline, _text_width(tick_line), legend_width], width, side, margin)
    thickness = max(1, round(scale * 1.6))
    text_height = cv2.getTextSize("Ag", FONT, scale, thickness)[0][1]
    gap = max(3, text_height // 2)
    bar_height = max(6, text_height)
    rows = [round(1.4 * text_height), bar_height, text_height] + [text_height] * bool(legend)
    band = np.full((sum(rows) + gap * (len(rows) + 1), width, 3), BAND_BGR, np.uint8)
    top = gap + rows[0]
    cv2.putText(band, verdict, (margin, top), FONT, 1.4 * scale, colour, thickness + 1, cv2.LINE_AA)
    verdict_width = cv2.getTextSize(f"{verdict}  ", FONT, 1.4 * scale, thickness + 1)[0][0]
    cv2.putText(band, score_text, (margin + verdict_width, top), FONT, scale, TEXT_BGR, thickness, cv2.LINE_AA)
    top += gap
    bar = np.linspace(0, 255, width - 2 * margin).astype(np.uint8)[None, :].repeat(bar_height, axis=0)
    band[top : top + bar_height, margin : width - margin] = cv2.applyColorMap(bar, cv2.COLORMAP_JET)
    if threshold is not None:
        tick_x = margin + round(THRESHOLD_LEVEL * (width - 2 * margin - 1))
        cv2.line(band, (tick_x, top - gap // 2), (tick_x, top + bar_height + gap // 2), (255, 255, 255), thickness + 1)
    top += bar_height + gap + text_height
    for position, text in ticks:
        text_width = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
        x = round(margin + position * (width - 2 * margin - text_width))  # left, centred, right aligned
        cv2.putText(band, text, (x, top), FONT, scale, TEXT_BGR, thickness, cv2.LINE_AA)
    x = margin
    top += gap + text_height
    for text, text_colour in legend:  # what the outlines mean, each written in its outline's colour
        cv2.putText(band, text, (x, top), FONT, scale, text_colour, thickness, cv2.LINE_AA)
        x += _text_width(f"{text}   ", scale)
    return band
