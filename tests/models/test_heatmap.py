"""Heatmap overlays (models/heatmap.py): one colour scale in thresholds for every frame, the part visible under a
calm map, and a caption with verdict, score and scale that fits inside the picture at every size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.heatmap import (
    FAIL_BGR,
    MASK_BGR,
    MAX_ENLARGED_PIXELS,
    MIN_WIDTH,
    PASS_BGR,
    SCALE_TOP,
    enlargement,
    overlay_heatmap,
)

THRESHOLD = 4.0
GREY = np.full((256, 256, 3), 128, np.uint8)


def _picture(overlay: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The part of an overlay showing the frame (the caption band lies below it)."""
    factor = enlargement(*frame.shape[:2])
    return overlay[: frame.shape[0] * factor, : frame.shape[1] * factor]


def _band(overlay: np.ndarray, frame: np.ndarray) -> np.ndarray:
    return overlay[frame.shape[0] * enlargement(*frame.shape[:2]) :]


def _headline(band: np.ndarray) -> np.ndarray:
    """The band's rows above its colour bar (the first rows that are mostly not the band's background)."""
    busy = (band != band[0, 0]).any(axis=2).mean(axis=1) > 0.5
    return band[: int(np.argmax(busy))]


def _jet(level: float) -> np.ndarray:
    return cv2.applyColorMap(np.array([[round(level * 255)]], np.uint8), cv2.COLORMAP_JET)[0, 0].astype(float)


def _pixels_of(image: np.ndarray, bgr: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    return np.abs(image.astype(int) - np.array(bgr)).max(axis=2) <= tolerance


def test_the_same_map_value_gets_the_same_colour_whatever_else_the_frame_holds() -> None:
    """A frame whose peak was far above the threshold had its scale stretched to that peak: its regions at 1.5x the
    threshold came out blue, inside the white outline that says they are above it, while another frame showed the
    same value in yellow."""
    lifted = np.full((64, 64), 1.5 * THRESHOLD, np.float32)
    spiked = lifted.copy()
    spiked[40:60, 40:60] = 40 * THRESHOLD
    plain, with_peak = overlay_heatmap(GREY, lifted, THRESHOLD, 6.0), overlay_heatmap(GREY, spiked, THRESHOLD, 9.0)
    np.testing.assert_array_equal(plain[:100, :100], with_peak[:100, :100])
    blue, green, red = plain[50, 50].astype(int)
    assert red > blue and green > blue  # above the threshold: yellow-green, not a below-threshold blue
    blue, green, red = with_peak[200, 200].astype(int)
    assert red - blue > 50 and red - green > 50  # the peak: red, hotter than its frame


def test_the_threshold_sits_mid_scale_and_colours_rise_with_the_value_up_to_the_scale_top() -> None:
    ratios = [0.0, 0.5, 1.0, 2.0, 4.0, SCALE_TOP]
    colours = [overlay_heatmap(GREY, np.full((8, 8), r * THRESHOLD, np.float32), THRESHOLD, 1.0)[128, 128]
               for r in ratios]  # fmt: skip
    opaque = 0.5 * _jet(0.5) + 0.5 * 128  # at the threshold the colours are half opaque
    np.testing.assert_allclose(colours[2], opaque, atol=2)
    np.testing.assert_allclose(colours[-1], 0.5 * _jet(1.0) + 0.5 * 128, atol=2)
    hue = [cv2.cvtColor(colour[None, None], cv2.COLOR_BGR2HSV)[0, 0, 0] for colour in colours[2:]]
    assert hue == sorted(hue, reverse=True) and len(set(hue)) == len(hue)  # green -> yellow -> orange -> red


def test_a_frame_well_under_the_threshold_shows_the_part_as_it_is() -> None:
    """The map used to be blended at 45% everywhere: a good part came out tinted dark blue (48 grey levels off)."""
    part = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    calm = np.random.default_rng(1).uniform(-1.0, 0.1 * THRESHOLD, (64, 64)).astype(np.float32)
    picture = _picture(overlay_heatmap(part, calm, THRESHOLD, 0.3), part)
    assert np.abs(picture.astype(int) - part[:, :, ::-1].astype(int)).mean() < 6
    assert not _pixels_of(picture, (255, 255, 255), tolerance=0).any()  # nothing outlined


def test_the_caption_states_the_verdict_and_score_below_the_frame() -> None:
    rng = np.random.default_rng(2)
    map_ = rng.uniform(0, THRESHOLD, (32, 32)).astype(np.float32)
    passed, failed = overlay_heatmap(GREY, map_, THRESHOLD, 3.0), overlay_heatmap(GREY, map_, THRESHOLD, 9.0)
    np.testing.assert_array_equal(_picture(passed, GREY), _picture(failed, GREY))  # the caption covers nothing
    assert passed.shape[0] > GREY.shape[0] + 40
    passed_headline, failed_headline = _headline(_band(passed, GREY)), _headline(_band(failed, GREY))
    assert _pixels_of(passed_headline, PASS_BGR).sum() > 30 and not _pixels_of(passed_headline, FAIL_BGR).any()
    assert _pixels_of(failed_headline, FAIL_BGR).sum() > 30 and not _pixels_of(failed_headline, PASS_BGR).any()
    other_threshold = overlay_heatmap(GREY, map_, THRESHOLD + 1, 3.0)
    assert not np.array_equal(_band(other_threshold, GREY), _band(passed, GREY))  # the threshold is written too


@pytest.mark.parametrize(("height", "width"), [(240, 105), (222, 128), (64, 600), (1500, 2000), (3000, 200)])
def test_the_caption_fits_inside_the_picture_at_every_frame_size(height: int, width: int) -> None:
    """MTD's tiles are 105 px wide and up: narrow frames are enlarged by a whole factor (their pixels kept), so the
    caption's text is at least ~10 px high; large frames get text in proportion. No text is cut at an edge."""
    frame = np.random.default_rng(3).integers(0, 256, (height, width), dtype=np.uint8)  # grayscale
    map_ = np.zeros((32, 32), np.float32)
    map_[10:20, 10:20] = 3 * THRESHOLD
    mask = np.zeros((height, width), bool)
    mask[height // 3 : height // 2, width // 3 : width // 2] = True
    overlay = overlay_heatmap(frame, map_, THRESHOLD, 8.5, mask)
    factor = enlargement(height, width)
    assert overlay.shape[1] == width * factor >= 256 and overlay.dtype == np.uint8
    band = _band(overlay, frame)
    background = np.all(band == band[0, 0], axis=2)
    assert background[:, :2].all() and background[:, -2:].all() and background[-2:].all()  # nothing cut at an edge
    text_rows = np.flatnonzero(_pixels_of(_headline(band), FAIL_BGR).any(axis=1))
    assert text_rows.size >= 10 and text_rows.size >= overlay.shape[1] / 100  # the verdict: legible, in proportion
    assert _pixels_of(band, MASK_BGR).any()  # the legend says what the magenta outline is
    if factor > 1:  # the frame's own pixels, each a factor x factor block, where the map is 0
        corner = _picture(overlay, frame)[: factor * 8, : factor * 8]
        expected = np.repeat(np.repeat(frame[:8, :8], factor, 0), factor, 1)
        np.testing.assert_array_equal(corner[:, :, 1], expected)


def test_a_defect_mask_is_outlined_where_it_lies() -> None:
    frame = np.full((200, 300, 3), 90, np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[50:90, 200:260] = True
    picture = _picture(overlay_heatmap(frame, np.zeros((16, 16), np.float32), THRESHOLD, 0.5, mask), frame)
    rows, columns = np.nonzero(_pixels_of(picture, MASK_BGR, tolerance=0))
    assert rows.size > 100
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == pytest.approx((50, 89, 200, 259), abs=2)
    assert not _pixels_of(picture[60:80, 210:250], MASK_BGR, tolerance=0).any()  # an outline, not a fill


def test_without_threshold_the_map_is_scaled_by_its_own_maximum_and_the_caption_says_so() -> None:
    map_ = np.zeros((32, 32), np.float32)
    map_[:16] = 7.0
    overlay = overlay_heatmap(GREY, map_, None, 7.0)
    np.testing.assert_allclose(overlay[10, 10], 0.5 * _jet(1.0) + 0.5 * 128, atol=2)  # its maximum at the top
    headline = _headline(_band(overlay, GREY))
    assert headline.shape[0] > 10 and (headline != headline[0, 0]).any()  # something is written: NO THRESHOLD
    assert not _pixels_of(headline, FAIL_BGR).any() and not _pixels_of(headline, PASS_BGR).any()  # no verdict
    assert not _pixels_of(_picture(overlay, GREY), (255, 255, 255), tolerance=0).any()  # no threshold outline


@pytest.mark.parametrize(("height", "width"), [(4000, 10), (600, 12000), (30000, 8)])
def test_an_overlay_is_about_the_size_of_its_frame_whatever_its_shape(height: int, width: int) -> None:
    """A tall, narrow frame was enlarged to 256 px wide whatever its height (8 x 60000 became 256 x 1.9 million:
    11 GB and 26 s in the sink), and a wide one's caption grew with its width (a 16384 x 1000 line-scan frame got a
    caption three times its own height). Enlarging and padding now stop at ``MAX_ENLARGED_PIXELS`` and the text
    follows the frame's shorter side."""
    frame = np.random.default_rng(4).integers(0, 256, (height, width), dtype=np.uint8)
    map_ = np.zeros((32, 32), np.float32)
    map_[10:20, 10:20] = 3 * THRESHOLD
    overlay = overlay_heatmap(frame, map_, THRESHOLD, 8.5)
    factor = enlargement(height, width)
    assert overlay.shape[0] * overlay.shape[1] <= 1.2 * max(height * width, MAX_ENLARGED_PIXELS)
    np.testing.assert_array_equal(_picture(overlay, frame)[: factor * 8, : factor * 8, 1],
                                  np.repeat(np.repeat(frame[:8, :8], factor, 0), factor, 1))  # fmt: skip
    if MIN_WIDTH * height * factor <= MAX_ENLARGED_PIXELS or width * factor >= MIN_WIDTH:  # room for a caption
        band = _band(overlay, frame)
        assert band.shape[0] <= max(height * factor, 2 * MIN_WIDTH) and band.shape[1] >= MIN_WIDTH
        assert np.flatnonzero(_pixels_of(_headline(band), FAIL_BGR).any(axis=1)).size >= 10  # the verdict, legible
    else:  # far taller than wide: the frame alone, no caption squeezed beside it
        assert overlay.shape == (height * factor, width * factor, 3)
