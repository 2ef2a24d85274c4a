"""Good-image folders of lines unlike MTD, made from images scikit-image ships, to check MTD-chosen defaults elsewhere.

Every default so far was chosen on a validation split of MTD's training images (select_defaults.py). MTD is one
kind of line: grayscale, unaligned tiles of one textured surface. Real lines differ, and a default that only wins
on MTD is a loss. This script writes folders of *good* frames for three other kinds of line; select_defaults.py
then carves its fit / validation split from each and pastes the same synthetic defects:

- ``gravel``: a grayscale natural texture, each frame a crop at a random place, angle (0-360 degrees) and scale
  (0.9-1.1) of scikit-image's ``gravel`` (512 x 512): unaligned like MTD's tiles, but coarse and irregular.
- ``tissue``: the same for ``immunohistochemistry`` (512 x 512, colour): a colour texture.
- ``cup``: a colour object photographed on a fixture: the centre 352 x 352 of ``coffee`` (400 x 600), moved by up
  to 4 px and 2 degrees (``models.synthetic.make_part``), with exposure drift (gain 0.9-1.1, offset +-8 grey
  levels) and sensor noise (sigma 3): aligned parts, as most inspection lines have.
- ``coins``: the same for the centre 256 x 256 of ``coins`` (303 x 384, grayscale): an aligned grayscale part
  with many similar small shapes.
- ``gravel_drift``, ``tissue_drift``: the textures under exposure drift (gain 0.85-1.15, offset +-10 grey levels,
  noise sigma 2), for the choice between standardised and raw frames (``[model] intensity``) where both content
  and exposure vary.

Frames are 224 x 224 (texture crops), 352 x 352 (cup) or 256 x 256 (coins) PNG files. Crops of one texture overlap
in content, though never pixel for pixel (each is rotated and scaled on its own); defaults are compared on equal
terms.

    python benchmarks/other_domains.py --out /tmp/domains [--frames 200]
    python benchmarks/select_defaults.py --data /tmp/domains/gravel --variants default patchcore ...
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from models.synthetic import make_part

TEXTURE_FRAME = 224
PART_FRAME = 352
COINS_FRAME = 256


def texture_frame(texture: np.ndarray, rng: np.random.Generator, size: int = TEXTURE_FRAME) -> np.ndarray:
    """A ``(size, size, C)`` crop of ``texture`` at a random place, angle and scale (borders never enter)."""
    height, width = texture.shape[:2]
    scale = float(rng.uniform(0.9, 1.1))
    # A crop's corners reach size / sqrt(2) from its centre at any angle; keep that inside the texture.
    reach = size * scale / np.sqrt(2) + 2
    centre = (float(rng.uniform(reach, width - reach)), float(rng.uniform(reach, height - reach)))
    matrix = cv2.getRotationMatrix2D(centre, float(rng.uniform(0, 360)), 1 / scale)
    matrix[:, 2] += np.array([size / 2, size / 2]) - np.array(centre)
    return cv2.warpAffine(texture, matrix, (size, size), flags=cv2.INTER_LINEAR)


def drift(frame: np.ndarray, rng: np.random.Generator, gain: float, offset: float, noise: float) -> np.ndarray:
    """Exposure drift (gain in ``1 +- gain``, offset in ``+-offset`` grey levels) and sensor noise (sigma ``noise``)."""
    drifted = frame.astype(np.float32) * rng.uniform(1 - gain, 1 + gain) + rng.uniform(-offset, offset)
    return np.clip(drifted + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)


def part_frame(photo: np.ndarray, rng: np.random.Generator, size: int = PART_FRAME) -> np.ndarray:
    """The photo's centre on a fixture: a little moved, with exposure drift and sensor noise."""
    return drift(make_part(photo, rng, size), rng, gain=0.1, offset=8, noise=3)


def domains() -> dict[str, Callable[[np.random.Generator], np.ndarray]]:
    """Domain name -> a function drawing one good frame (RGB or grayscale uint8)."""
    import skimage.data

    gravel, tissue, cup = skimage.data.gravel(), skimage.data.immunohistochemistry(), skimage.data.coffee()
    coins = skimage.data.coins()
    return {
        "gravel": lambda rng: texture_frame(gravel, rng),
        "tissue": lambda rng: texture_frame(tissue, rng),
        "cup": lambda rng: part_frame(cup, rng),
        "coins": lambda rng: drift(make_part(coins, rng, COINS_FRAME), rng, gain=0.1, offset=8, noise=3),
        "gravel_drift": lambda rng: drift(texture_frame(gravel, rng), rng, gain=0.15, offset=10, noise=2),
        "tissue_drift": lambda rng: drift(texture_frame(tissue, rng), rng, gain=0.15, offset=10, noise=2),
    }


def write_domain(out_dir: Path, draw: Callable[[np.random.Generator], np.ndarray], frames: int, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(frames):
        frame = draw(rng)
        if frame.ndim == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out_dir / f"frame_{number:04d}.png"), frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=200, help="good frames per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, draw in domains().items():
        write_domain(args.out / name, draw, args.frames, args.seed)
        print(f"{args.out / name}: {args.frames} good frames")


if __name__ == "__main__":
    main()
