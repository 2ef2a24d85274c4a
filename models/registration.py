"""Registering frames to the good frames' pose before scoring (``[model] registration``).

N-pad shifting (``models.shifting``) forgives a part that sits a pixel or two off; a part on a loose fixture moves
further (4-8 px, a few degrees), and every method here compares each position with the same position of the good
frames. Registration moves each frame into a common pose first, and its heatmap back afterwards, so verdicts and
heatmaps stay in the frame's own coordinates.

- Reference ``(R, R)`` float32 (``R = SIDE``): the grey levels of up to ``REFERENCE_FRAMES`` good frames, each
  stretched to ``R x R``; the pixel-wise median, then the median again after registering each frame to it.
- A frame's pose: phase correlation against the reference (translation, with its peak response: ~1 for the same
  scene moved, ~0 where frames share no layout), refined by ECC to a rigid transform (translation + rotation).
  ``(2, 3)`` affine maps reference coordinates on the ``R x R`` grid to the frame's; ECC failing keeps the
  translation. A frame is left as it is when its response falls below ``ACCEPT_FRACTION`` of the good frames'
  median or the pose goes beyond ``MAX_SHIFT`` / ``MAX_DEGREES`` (a different or badly framed part: scored unmoved).
- With an inspection mask (``models.inspection_mask``, drawn in the good frames' pose, which is the reference's),
  ``ignored`` ``(R, R)`` bool marks the grid pixels it ignores: phase correlation sees them flat (the grid's mean
  elsewhere) in the reference and the frame, and ECC leaves them out (a template mask), so a lot code or a pen mark
  there does not move the pose.
- ``registration = "auto"`` turns it on only when the good frames share a layout: their median response is at
  least ``MIN_RESPONSE``. Measured (``choose_registration``): a cup on a fixture 0.96, coins 0.95, the demo
  line's brick part 0.95; no common layout, left off: MTD's tiles 0.06, gravel 0.15 (0.10 under exposure drift),
  tissue 0.05 (0.05).

Frames keep their size; only their content moves. What a moved frame does not show is filled from ``fill``, the
registered good frames' colour median, over the frames that show each pixel: replicated edges read as defects (on
a small test line of coins, a part 3 px off scored 21 with replicated edges, 15 unregistered, 5.7 with the fill, as
in place). Maps ``(N, S, S)`` over the frames stretched to the square are moved back with the same transform
scaled to ``S``.

16-bit frames are posed on their own range (``full_scale``), moved and filled in 16 bits: a 12- or 16-bit twin of
an 8-bit frame gets its pose (within 0.02 grid px) and its pixels moved exactly, where the 8-bit frame is rounded to
whole grey levels (0.23 of a level on average), and again when the scorer resizes it. A registered model can see
that rounding where registered good frames agree within a grey level, as on noise-free synthetic lines (the demo
line's: 0.45, median per pixel): there a model fitted on 8-bit frames scored the good twins 20-30% higher (with
position statistics 8.7-10.3 against a threshold of 4.55, the 8-bit frames 1.7-3.6), and one fitted on the twins
scored the 8-bit frames higher. Not pose, fill or warp: the twin moved with the 8-bit pose scores the same, the 8-bit
frame moved in floats scores as its twin; camera noise of 2 grey levels brings the gap to a few percent. Fit on
frames of the depth the line sends.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.errors import ArtifactError
from models.images import full_scale, read_sample, to_rgb, to_uint8_of_own_range, to_unit_range
from models.inspection_mask import InspectionMask

SIDE = 128  # reference grid
FILL_SIDE = 256  # colour median of the registered good frames, filling what a moved frame does not show
REFERENCE_FRAMES = 64
MIN_FRAMES = 8
MIN_RESPONSE = 0.3  # "auto": the good frames' median phase-correlation response needed to register
ACCEPT_FRACTION = 0.3  # a frame whose response is below this fraction of the good frames' median is left unmoved
MAX_SHIFT = 0.25  # of the frame's side
MAX_DEGREES = 15.0
ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
WINDOW = cv2.createHanningWindow((SIDE, SIDE), cv2.CV_32F)  # phase correlation's window (read only)
FILE = "registration.npz"


def _grid(image: np.ndarray) -> np.ndarray:
    """RGB uint8 or uint16 ``(H, W, 3)`` -> grey ``(R, R)`` float32 in [0, 1] of the frame's own range
    (``models.images.full_scale``: 12-bit data in 16 bits is not taken for a dark 16-bit frame)."""
    small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    if image.dtype == np.uint16:
        return cv2.cvtColor(to_unit_range(small, image), cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0  # grey rounded to 8 bits, as always


def _to_grid(side_x: float, side_y: float) -> np.ndarray:
    """``(3, 3)``: ``R x R`` grid coordinates -> coordinates of an image stretched from it (pixel centres kept)."""
    scale_x, scale_y = side_x / SIDE, side_y / SIDE
    return np.array([[scale_x, 0, 0.5 * scale_x - 0.5], [0, scale_y, 0.5 * scale_y - 0.5], [0, 0, 1]])


def scaled(transform: np.ndarray, width: float, height: float) -> np.ndarray:
    """A ``(2, 3)`` transform on the ``R x R`` grid, as the same motion of a ``width x height`` image."""
    grid = _to_grid(width, height)
    return (grid @ np.vstack([transform, [0, 0, 1]]) @ np.linalg.inv(grid))[:2]


def ignored_grid(mask: InspectionMask | None) -> np.ndarray | None:
    """``(R, R)`` bool: the grid pixels an inspection mask mostly ignores, or None without a mask; MaskError when it
    ignores them all."""
    if mask is None:
        return None
    mask.check_size(SIDE, SIDE, 'the registration grid; or [model] registration = "off"')
    return mask.at(SIDE, SIDE) <= 0.5


def _flattened(grid: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """A copy of ``grid`` with its ``ignored`` pixels at the mean of the others."""
    flat = grid.copy()
    flat[ignored] = grid[~ignored].mean()
    return flat


def estimate_pose(
    reference: np.ndarray, frame: np.ndarray, ignored: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``(2, 3)`` float32 transform (reference grid -> ``frame``'s grid) and the phase-correlation response, the
    ``ignored`` grid pixels (reference pose) left out. Copies go to OpenCV: its phase correlation writes its window
    into the arrays it is given."""
    flat_reference, flat_frame = (reference, frame) if ignored is None else (
        _flattened(reference, ignored), _flattened(frame, ignored))  # fmt: skip
    (shift_x, shift_y), response = cv2.phaseCorrelate(flat_reference.copy(), flat_frame.copy(), WINDOW)
    transform = np.array([[1, 0, shift_x], [0, 1, shift_y]], np.float32)
    try:
        if ignored is None:
            _, refined = cv2.findTransformECC(reference, frame, transform.copy(), cv2.MOTION_EUCLIDEAN, ECC_CRITERIA)
        else:
            inspected = np.where(ignored, 0, 255).astype(np.uint8)
            everywhere = np.full_like(inspected, 255)
            _, refined = cv2.findTransformECCWithMask(reference, frame, inspected, everywhere, transform.copy(),
                                                      cv2.MOTION_EUCLIDEAN, ECC_CRITERIA, 5)  # fmt: skip
        transform = np.asarray(refined, np.float32)
    except cv2.error:  # ECC did not converge: keep the translation
        pass
    return transform, float(response)


def _warp_with_mask(image: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` moved by the frame-size ``matrix`` (target -> source coordinates) and the ``(H, W)`` bool mask of
    the pixels it shows; edges are replicated for the interpolation, so no pixel blends with black."""
    height, width = image.shape[:2]
    moved = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    inside = cv2.warpAffine(np.ones((height, width), np.uint8), matrix, (width, height),
                            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)  # fmt: skip
    return moved, inside.astype(bool)


def _at_most(image: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _within_limits(transform: np.ndarray) -> bool:
    degrees = abs(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
    return bool(np.abs(transform[:, 2]).max() <= MAX_SHIFT * SIDE and degrees <= MAX_DEGREES)


def _is_identity(transform: np.ndarray) -> bool:
    return bool(np.abs(transform - np.eye(2, 3)).max() < 1e-3)


@dataclass
class Registration:
    """The reference ``(R, R)``, the good frames' median response (``fit_response``), ``fill`` ``(F, F, 3)``
    uint8: the median of the registered good frames in colour, which fills what a moved frame does not show, and
    ``max_side``: the long side frames are scaled down to first (None: kept, as tiling needs); ``ignored``: the
    grid pixels an inspection mask ignores (``ignored_grid``; not stored: the model stores the mask)."""

    reference: np.ndarray
    fit_response: float
    fill: np.ndarray
    max_side: int | None = None
    ignored: np.ndarray | None = field(default=None, compare=False)
    _fills: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def _fill(self, width: int, height: int) -> np.ndarray:
        """``fill`` at a frame's size, resized once per size (a line's frames all have one)."""
        if (width, height) not in self._fills:
            self._fills[(width, height)] = cv2.resize(self.fill, (width, height), interpolation=cv2.INTER_LINEAR)
        return self._fills[(width, height)]

    def poses(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """``(2, 3)`` grid transforms of RGB uint8 frames; None where the pose is not trusted."""
        poses: list[np.ndarray | None] = []
        for image in images:
            transform, response = estimate_pose(self.reference, _grid(image), self.ignored)
            trusted = response >= ACCEPT_FRACTION * self.fit_response and _within_limits(transform)
            poses.append(transform if trusted else None)
        return poses

    def align(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Frames (any format ``models.images.to_rgb`` accepts) as RGB of their depth moved into the reference's pose,
        with their grid transforms (None: not registered, the frame left as it came). Frames longer than
        ``max_side`` are first scaled down to it (aspect kept): the models see them smaller anyway, and the warp
        costs with the pixel count (50 ms at 2048 x 2048)."""
        images = [_at_most(to_rgb(image, f"image {position}"), self.max_side)
                  for position, image in enumerate(images)]  # fmt: skip
        poses = self.poses(images)
        aligned = []
        for image, transform in zip(images, poses, strict=True):
            if transform is None or _is_identity(transform):
                aligned.append(image)
                continue
            height, width = image.shape[:2]
            matrix = scaled(transform, width, height)
            warped, inside = _warp_with_mask(image, matrix)
            fill = self._fill(width, height)
            if image.dtype == np.uint16:  # the fill is kept in 8 bits of the good frames' own range: put it on this
                scale = full_scale(image) / 255.0  # frame's (12-bit data in 16 bits: 4095, not 65535)
                fill = np.round(fill.astype(np.float32) * np.float32(scale)).astype(np.uint16)
            aligned.append(np.where(inside[..., None], warped, fill))
        return aligned, poses

    @staticmethod
    def restore(maps: np.ndarray, poses: Sequence[np.ndarray | None]) -> np.ndarray:
        """``(N, S, S)`` maps of aligned frames -> the same over the frames as they came."""
        size = maps.shape[-1]
        restored = maps.copy()
        for index, transform in enumerate(poses):
            if transform is not None and not _is_identity(transform):
                restored[index] = cv2.warpAffine(maps[index], scaled(transform, size, size), (size, size),
                                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
        return restored

    def save(self, model_dir: Path) -> str:
        np.savez(model_dir / FILE, reference=self.reference, fit_response=np.float32(self.fit_response), fill=self.fill,
                 max_side=np.int64(self.max_side or 0))  # fmt: skip
        return FILE

    @classmethod
    def load(cls, model_dir: Path, ignored: np.ndarray | None = None) -> Registration:
        try:
            with np.load(model_dir / FILE, allow_pickle=False) as data:
                reference, fit_response = data["reference"].astype(np.float32), float(data["fit_response"])
                fill = data["fill"].astype(np.uint8)
                max_side = int(data["max_side"]) or None
        except (OSError, KeyError, ValueError) as error:
            msg = f"{model_dir / FILE}: cannot read the registration reference ({error})"
            raise ArtifactError(msg) from None
        if reference.shape != (SIDE, SIDE) or fill.shape != (FILL_SIDE, FILL_SIDE, 3):
            msg = (f"{model_dir / FILE}: reference and fill of shapes {reference.shape} and {fill.shape}, expected "
                   f"{(SIDE, SIDE)} and {(FILL_SIDE, FILL_SIDE, 3)}")  # fmt: skip
            raise ArtifactError(msg)
        return cls(reference, fit_response, fill, max_side, ignored)


@dataclass(frozen=True)
class RegistrationChoice:
    """The fitted registration (None: frames are scored as they come) and one line for people."""

    registration: Registration | None
    description: str


def _registered_median(images: Sequence[np.ndarray], poses: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel-wise median of same-size images, each first moved by its grid pose into the reference's, over the
    frames that show the pixel (near the borders not all do; where none does, over their reflections)."""
    height, width = images[0].shape[:2]
    shown, reflected = [], []
    for image, pose in zip(images, poses, strict=True):
        moved, inside = _warp_with_mask(image.astype(np.float32), scaled(pose, width, height))
        reflected.append(moved)
        shown.append(np.where(inside.reshape(inside.shape + (1,) * (moved.ndim - 2)), moved, np.nan))
    with warnings.catch_warnings():  # pixels no frame shows are expected: filled from the reflections below
        warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
        median = np.nanmedian(np.stack(shown), axis=0) if len(shown) else np.empty(0)
    median = np.where(np.isnan(median), np.median(np.stack(reflected), axis=0), median)
    return median.astype(images[0].dtype) if images[0].dtype != np.uint8 else median.round().astype(np.uint8)


def build_registration(
    images: Sequence[np.ndarray], max_side: int | None = None, ignored: np.ndarray | None = None
) -> Registration:
    """A registration from good RGB frames (any sizes): the reference is the grids' median, then the median again of
    the grids registered to it; the fill likewise, in colour; ``fit_response`` the frames' median response; poses
    estimated without the ``ignored`` grid pixels."""
    grids = [_grid(image) for image in images]
    first = np.median(np.stack(grids), axis=0).astype(np.float32)
    reference = _registered_median(grids, [estimate_pose(first, grid, ignored)[0] for grid in grids])
    poses, responses = zip(*(estimate_pose(reference, grid, ignored) for grid in grids), strict=True)
    colour = [cv2.resize(to_uint8_of_own_range(image), (FILL_SIDE, FILL_SIDE), interpolation=cv2.INTER_AREA)
              for image in images]  # fmt: skip
    fill = _registered_median(colour, poses)
    return Registration(reference, float(np.median(responses)), fill, max_side, ignored)


def choose_registration(
    paths: Sequence[Path], setting: str, max_side: int | None = None, ignored: np.ndarray | None = None
) -> RegistrationChoice:
    """``setting`` "off", "on" or "auto" resolved on good image files (up to ``REFERENCE_FRAMES``, evenly spaced;
    unreadable ones passed over: the fit reports them); ``max_side`` and ``ignored`` as in ``Registration``."""
    if setting == "off":
        return RegistrationChoice(None, "")
    images = read_sample(paths, REFERENCE_FRAMES, keep_depth=True)
    if not images or (setting == "auto" and len(images) < MIN_FRAMES):
        too_few = f"only {len(images)} readable good frames; {MIN_FRAMES} needed to decide"
        return RegistrationChoice(None, f"{setting}: off ({too_few})")
    registration = build_registration(images, max_side, ignored)
    response = registration.fit_response
    measured = f"the good frames' median phase-correlation response {response:.2f}, over {len(images)} frames"
    if setting == "auto" and response < MIN_RESPONSE:
        return RegistrationChoice(None, f"auto: off ({measured}: no common layout; {MIN_RESPONSE} turns it on)")
    return RegistrationChoice(registration, f"{setting}: on ({measured})")
