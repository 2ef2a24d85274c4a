"""Synthetic parts and defects, for the demo line, tests, and choosing defaults without touching test data.

- ``add_synthetic_defect(image, rng, strength=1.0)`` -> ``(defective image, bool mask)``: one of a scratch (a
  thin curved line), a blob (a soft dark or bright ellipse), a cut-paste patch (a piece of the same image moved
  and rotated) or a texture patch (noise); or, with ``kinds=SURFACE_KINDS``, a crack (jagged, 1-2 px), a hole,
  a chip off an edge or a stain (large, soft, low contrast); or, with ``kinds=LARGE_KINDS``, defects covering
  10-50% of the frame (a large stain, a worn smoothed patch, a shaded band). Works on RGB uint8 ``(H, W, 3)``.
  ``strength`` scales the contrast (shade, noise amplitude, cut-paste opacity): below 1 gives subtle defects.
- ``make_part(texture, rng, size, max_shift, max_rotation)``: a "good part", a crop of a scikit-image texture
  with a small random translation and rotation, as parts arrive on a real line.
- ``make_demo_line(out_dir, ...)`` writes a small MVTec-layout dataset from scikit-image's ``brick`` texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "blob", "cutpaste", "noise")
# Shaped after defects common on machined and sintered parts (and named in public defect datasets): a thin dark
# jagged crack, a small dark hole, a chip broken off an edge (background shows), a large soft uneven patch.
SURFACE_KINDS = ("crack", "hole", "chip", "stain")
# Defects covering a large share of the frame (roughly 10-50%), as when frames are crops around a part's surface:
# a large soft discoloured area, a worn patch whose texture is smoothed away, a shaded band across the frame.
LARGE_KINDS = ("large_stain", "worn", "band")


def _scratch(image: np.ndarray, rng: np.random.Generator, margin: float) -> np.ndarray:
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    points = [rng.uniform([margin * width, margin * height], [(1 - margin) * width, (1 - margin) * height])]
    length = rng.uniform(0.15, 0.4) * min(height, width)
    angle = rng.uniform(0, np.pi)
    for _ in range(4):
        angle += rng.normal(0, 0.3)
        step = length / 4 * np.array([np.cos(angle), np.sin(angle)])
        points.append(points[-1] + step)
    thickness = max(1, round(min(height, width) * rng.uniform(0.008, 0.02)))
    cv2.polylines(mask, [np.array(points, np.int32)], False, 1, thickness)
    return mask.astype(bool)


def _ellipse(image: np.ndarray, rng: np.random.Generator, scale: tuple[float, float], margin: float) -> np.ndarray:
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    centre = (int(rng.uniform(margin, 1 - margin) * width), int(rng.uniform(margin, 1 - margin) * height))
    axes = tuple(max(2, int(rng.uniform(*scale) * min(height, width))) for _ in range(2))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def _crack(image: np.ndarray, rng: np.random.Generator, margin: float) -> np.ndarray:
    """A jagged random walk of short segments, 1-2 px wide whatever the image size (real cracks do not scale)."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    point = rng.uniform([margin * width, margin * height], [(1 - margin) * width, (1 - margin) * height])
    points = [point]
    angle = rng.uniform(0, 2 * np.pi)
    steps = int(rng.integers(8, 20))
    step = rng.uniform(0.2, 0.5) * min(height, width) / steps
    for _ in range(steps):
        angle += rng.normal(0, 0.6)
        points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    cv2.polylines(mask, [np.array(points, np.int32)], False, 1, int(rng.integers(1, 3)))
    return mask.astype(bool)


def _chip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A piece missing from one edge: an irregular polygon whose base lies on the image border."""
    height, width = image.shape[:2]
    side = int(rng.integers(4))
    along, span = (width, height) if side in (0, 1) else (height, width)
    centre = rng.uniform(0.1, 0.9) * along
    half = rng.uniform(0.05, 0.15) * along
    depth = rng.uniform(0.05, 0.15) * span
    xs = np.linspace(centre - half, centre + half, 7)
    ys = np.concatenate([[0.0], rng.uniform(0.4, 1.0, 5) * depth, [0.0]])
    ys = np.concatenate([[-1.0], ys, [-1.0]])
    xs = np.concatenate([[xs[0]], xs, [xs[-1]]])
    if side == 0:  # top
        polygon = np.stack([xs, ys], 1)
    elif side == 1:  # bottom
        polygon = np.stack([xs, height - 1 - ys], 1)
    elif side == 2:  # left
        polygon = np.stack([ys, xs], 1)
    else:  # right
        polygon = np.stack([width - 1 - ys, xs], 1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [polygon.round().astype(np.int32)], 1)
    return mask.astype(bool)


def _shaded_ellipse(
    out: np.ndarray, rng: np.random.Generator, scale: tuple[float, float], margin: float,
    blur: tuple[float, float], shades: tuple[float, float], strength: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A soft dark or bright ellipse on float ``out``; ``blur`` = (minimum sigma, sigma per pixel of the short
    side). Returns the shaded image and where the shading reaches half strength."""
    height, width = out.shape[:2]
    mask = _ellipse(out, rng, scale, margin)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(blur[0], blur[1] * min(height, width)))
    shade = strength * rng.choice([-1.0, 1.0]) * rng.uniform(*shades)
    return np.clip(out + soft[:, :, None] * shade, 0, 255), soft > 0.5


def add_synthetic_defect(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    strength: float = 1.0,
    anywhere: bool = False,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``(H, W, 3)`` -> ``(image with one defect, mask (H, W) bool)``; ``kind`` (default: one drawn from
    ``kinds``, see DEFECT_KINDS and SURFACE_KINDS) starts in the central region unless ``anywhere`` (then also on the
    borders, where real edge defects such as breaks sit); a chip always sits on an edge."""
    if not 0.0 < strength <= 1.0:
        msg = f"strength must be in (0, 1], got {strength}"
        raise ValueError(msg)
    kind = kind or kinds[int(rng.integers(len(kinds)))]
    margin = 0.0 if anywhere else 0.2
    out = image.astype(np.float32)
    height, width = image.shape[:2]
    if kind == "scratch":
        mask = _scratch(image, rng, 0.0 if anywhere else 0.15)
        shade = strength * rng.choice([-1.0, 1.0]) * rng.uniform(60, 110)
        out[mask] = np.clip(out[mask] + shade, 0, 255)
    elif kind == "blob":
        out, mask = _shaded_ellipse(out, rng, (0.03, 0.09), margin, (1.0, 0.01), (50, 100), strength)
    elif kind == "cutpaste":
        mask = _ellipse(image, rng, (0.05, 0.12), margin)
        source_angle = float(rng.uniform(30, 150))
        rotation = cv2.getRotationMatrix2D((width / 2, height / 2), source_angle, 1.0)
        rotation[:, 2] += rng.uniform(-0.3, 0.3, size=2) * np.array([width, height])
        moved = cv2.warpAffine(image, rotation, (width, height), borderMode=cv2.BORDER_REFLECT)
        out[mask] = strength * moved[mask] + (1.0 - strength) * out[mask]
    elif kind == "noise":
        mask = _ellipse(image, rng, (0.04, 0.1), margin)
        noise = rng.normal(0, 45 * strength, size=image.shape).astype(np.float32)
        out[mask] = np.clip(out[mask] + noise[mask], 0, 255)
    elif kind == "crack":
        mask = _crack(image, rng, 0.0 if anywhere else 0.15)
        out[mask] = np.clip(out[mask] - strength * rng.uniform(50, 100), 0, 255)
    elif kind == "hole":
        mask = _ellipse(image, rng, (0.015, 0.04), margin)
        core = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)
        out = np.clip(out - core[:, :, None] * strength * rng.uniform(60, 120), 0, 255)
    elif kind == "chip":
        mask = _chip(image, rng)
        background = rng.uniform(5, 35)
        out[mask] = strength * background + (1.0 - strength) * out[mask]
    elif kind == "stain":
        out, mask = _shaded_ellipse(out, rng, (0.12, 0.3), margin, (2.0, 0.05), (25, 50), strength)
    elif kind == "large_stain":
        out, mask = _shaded_ellipse(out, rng, (0.25, 0.45), margin, (2.0, 0.05), (30, 60), strength)
    elif kind == "worn":
        mask = _ellipse(image, rng, (0.25, 0.45), margin)
        smoothed = cv2.GaussianBlur(out, (0, 0), max(2.0, 0.02 * min(height, width)))
        out[mask] = strength * smoothed[mask] + (1.0 - strength) * out[mask]
    elif kind == "band":
        mask = np.zeros((height, width), bool)
        thickness = rng.uniform(0.2, 0.5)
        if rng.random() < 0.5:
            start = int(rng.uniform(0, 1 - thickness) * height)
            mask[start : start + int(thickness * height)] = True
        else:
            start = int(rng.uniform(0, 1 - thickness) * width)
            mask[:, start : start + int(thickness * width)] = True
        out[mask] = np.clip(out[mask] + strength * rng.choice([-1.0, 1.0]) * rng.uniform(30, 60), 0, 255)
    else:
        msg = f"unknown defect kind {kind!r}; choose one of {DEFECT_KINDS + SURFACE_KINDS + LARGE_KINDS}"
        raise ValueError(msg)
    return out.astype(np.uint8), mask


def make_part(
    texture: np.ndarray, rng: np.random.Generator, size: int, max_shift: float = 4.0, max_rotation: float = 2.0
) -> np.ndarray:
    """A ``(size, size, 3)`` crop from the centre of ``texture``, translated and rotated a little."""
    height, width = texture.shape[:2]
    angle = float(rng.uniform(-max_rotation, max_rotation))
    matrix = np.asarray(cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0), dtype=np.float64)
    matrix[:, 2] += rng.uniform(-max_shift, max_shift, size=2)
    moved = cv2.warpAffine(texture, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
    top, left = (height - size) // 2, (width - size) // 2
    crop = moved[top : top + size, left : left + size]
    return np.repeat(crop[:, :, None], 3, axis=2) if crop.ndim == 2 else crop


@dataclass(frozen=True)
class DemoLine:
    root: Path
    train_dir: Path
    test_images: list[Path]
    test_labels: list[int]


def make_demo_line(
    out_dir: Path, n_train: int = 64, n_test_good: int = 20, n_test_defect: int = 20, image_size: int = 256,
    seed: int = 0,
) -> DemoLine:  # fmt: skip
    """Write a demo dataset (MVTec layout) made from scikit-image's ``brick`` texture."""
    import skimage.data

    texture = skimage.data.brick()
    if min(texture.shape[:2]) < image_size + 16:
        msg = f"demo image_size must be at most {min(texture.shape[:2]) - 16}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    train_dir = out_dir / "train" / "good"
    good_dir, defect_dir = out_dir / "test" / "good", out_dir / "test" / "defect"
    mask_dir = out_dir / "ground_truth" / "defect"
    for directory in (train_dir, good_dir, defect_dir, mask_dir):
        directory.mkdir(parents=True, exist_ok=True)
    for number in range(n_train):
        cv2.imwrite(str(train_dir / f"part_{number:04d}.png"), make_part(texture, rng, image_size))
    test_images, test_labels = [], []
    for number in range(n_test_good):
        path = good_dir / f"good_{number:04d}.png"
        cv2.imwrite(str(path), make_part(texture, rng, image_size))
        test_images.append(path)
        test_labels.append(0)
    for number in range(n_test_defect):
        defective, mask = add_synthetic_defect(make_part(texture, rng, image_size), rng)
        path = defect_dir / f"defect_{number:04d}.png"
        cv2.imwrite(str(path), defective)
        cv2.imwrite(str(mask_dir / f"defect_{number:04d}_mask.png"), mask.astype(np.uint8) * 255)
        test_images.append(path)
        test_labels.append(1)
    return DemoLine(out_dir, train_dir, test_images, test_labels)
