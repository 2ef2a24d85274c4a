"""Inspection masks: the part of the frame a line inspects; the rest (a lot code printed on every part, a label, a
clamp of the fixture) is ignored.

A mask is an image drawn over a good frame as the camera delivers it (with registration on, in the good frames'
pose, which a good frame has): opaque pixels of grey level 128 or more are inspected, darker ones ignored. A drawing
with transparent pixels is refused: editors differ on what a transparent pixel means (and reading it dropped the
alpha channel, so an "ignored" region left transparent over white read as inspected). It is stored at its own
resolution as ``inspected`` ``(H0, W0)`` bool and resized to wherever it is used, so it may be drawn at any scale of
the frame, of the same aspect: a frame of another aspect (a camera set to another region of interest) is refused at
fitting and at scoring (``aspect_mismatch``), where stretching the mask over it would inspect the wrong places.

Fitting's automatic choices leave ignored pixels out: the intensity choice (``models.intensity``) and the poses of
registration (``models.registration.ignored_grid``). Then the mask acts twice, in fitting and scoring alike
(``models.scorer``):

1. Before the backbone (``preprocess``): each frame's ignored pixels of its ``(3, S, S)`` input are set to one flat
   grey (``FILL``) after its intensity standardisation, whose mean and spread are taken over inspected pixels only.
   Whatever appears there never reaches the features: every method, its image score included, sees the same grey in
   every frame.
2. After the method (``Scorer``): maps ``(N, S, S)`` are smoothed over inspected pixels only (a normalised
   convolution, so a defect at the mask's edge is not diluted by the grey), image scores come from inspected pixels
   and patch cells only, and ignored pixels of the heatmap read as the frame's lowest inspected value.

``resize = "tile"`` cannot take a mask (it cuts frames of any length into pieces; a mask needs one geometry). A mask
must inspect a whole pixel at every size it is used at (each method's input and maps, the registration grid):
fitting refuses a thinner one before it starts (``check_size``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from models.datasets import image_shape
from models.images import ImageError, decode_image

FILE = "inspection_mask.png"
FILL = 0.449  # ImageNet's pixel mean, averaged over channels (scorer.STANDARD_MEAN): the grey ignored pixels become
ASPECT_TOLERANCE = 0.02  # a mask and the frames it is fitted on may differ this much in aspect (rounding of scales)
MAX_CACHED_SIZES = 64  # sizes ``at`` keeps the resized mask of (a line's frames have one or a few)
NOTHING_SCORED = "nothing was scored: leave them out, or score them with a model whose mask was drawn on their frames"
MIN_CELL_SHARE = 0.5  # a patch cell counts for the image score when at least this share of its pixels is inspected


class MaskError(ValueError):
    """A mask that cannot be used: unreadable, inspecting nothing, or not of the frames' geometry."""


@dataclass(eq=False)
class InspectionMask:
    """Which pixels of a frame are inspected: ``inspected`` ``(H0, W0)`` bool at the drawing's resolution."""

    inspected: np.ndarray
    _resized: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _derived: dict[Hashable, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.inspected.ndim != 2 or self.inspected.dtype != np.bool_ or min(self.inspected.shape) < 1:
            msg = f"an inspection mask is a (H, W) bool array, got {self.inspected.dtype} {self.inspected.shape}"
            raise MaskError(msg)
        if not self.inspected.any():
            msg = "the inspection mask inspects nothing: draw the inspected region in white (grey level >= 128)"
            raise MaskError(msg)

    @classmethod
    def from_image(cls, path: Path | str) -> InspectionMask:
        """The mask drawn in an image file (any format and depth lineinspect reads): white inspected, black not.
        Raises MaskError naming the file when it cannot be read, inspects nothing or has transparent pixels."""
        try:
            data = Path(path).read_bytes()
            rgb = decode_image(data, str(path))
        except OSError as error:
            msg = f"inspection mask {path}: cannot read file ({error.strerror or error})"
            raise MaskError(msg) from None
        except ImageError as error:
            msg = f"inspection mask {error}"
            raise MaskError(msg) from None
        transparent = transparent_share(data)
        if transparent > 0:
            msg = (f"{path}: {100 * transparent:.2f}% of the inspection mask's pixels are transparent, and editors "
                   "differ on whether a transparent pixel is inspected or ignored: flatten the drawing onto an opaque "
                   "background and save it without transparency (opaque white inspected, black ignored)")  # fmt: skip
            raise MaskError(msg)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        try:
            return cls(grey >= 128)
        except MaskError as error:
            msg = f"{path}: {error}"
            raise MaskError(msg) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InspectionMask) and np.array_equal(self.inspected, other.inspected)

    __hash__ = None  # type: ignore[assignment]  # mutable cache inside: equal by content, not hashable

    @property
    def share(self) -> float:
        """The share of the frame inspected, in [0, 1]."""
        return float(self.inspected.mean())

    def describe(self) -> str:
        height, width = self.inspected.shape
        return f"inspects {100 * self.share:.1f}% of the frame (mask drawn at {width}x{height})"

    def at(self, height: int, width: int) -> np.ndarray:
        """``(height, width)`` float32 in [0, 1]: the inspected share of each pixel at that size (area-weighted,
        so a pixel on the mask's edge is partly inspected). Cached per size."""
        key = (height, width)
        if key not in self._resized:
            if len(self._resized) >= MAX_CACHED_SIZES:  # padded frames of many aspects: keep the cache bounded
                self._resized.clear()
            source = self.inspected.astype(np.float32)
            shrinking = height < source.shape[0] or width < source.shape[1]
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            self._resized[key] = np.clip(cv2.resize(source, (width, height), interpolation=interpolation), 0.0, 1.0)
        return self._resized[key]

    def derived(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """What ``compute`` derives from the mask, computed once per ``key`` (a scorer's per-size constants: they
        would otherwise be recomputed on every batch)."""
        if key not in self._derived:
            if len(self._derived) >= MAX_CACHED_SIZES:
                self._derived.clear()
            self._derived[key] = compute()
        return self._derived[key]

    def pixels(self, size: int) -> torch.Tensor:
        """``(size, size)`` bool: the pixels of a square map that are inspected (more than half their area)."""
        return self.derived(("pixels", size), lambda: torch.from_numpy(self.at(size, size) > 0.5))

    def cell_shares(self, size: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(grid_h * grid_w,)`` float: the inspected share of each patch cell of a ``(size, size)`` map."""

        def compute() -> torch.Tensor:
            inspected = self.pixels(size).float()[None, None]
            return torch.nn.functional.adaptive_avg_pool2d(inspected, (grid_h, grid_w)).flatten()

        return self.derived(("cell shares", size, grid_h, grid_w), compute)

    def cells(self, size: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(grid_h * grid_w,)`` bool: the patch cells of a ``(size, size)`` map that count for the image score
        (``MIN_CELL_SHARE`` of them inspected; where no cell has that much, every cell with any inspected pixel)."""

        def compute() -> torch.Tensor:
            shares = self.cell_shares(size, grid_h, grid_w)
            counted = shares >= MIN_CELL_SHARE
            return counted if bool(counted.any()) else shares > 0

        return self.derived(("cells", size, grid_h, grid_w), compute)

    def check_size(self, height: int, width: int, use: str) -> None:
        """Raise MaskError unless some pixel is mostly inspected at ``height x width``, where the mask is used as
        ``use`` says: an input's standardisation, a map's smoothing and lowest value, a pose need one."""
        if not (self.at(height, width) > 0.5).any():
            msg = (f"the inspection mask inspects no whole pixel at {width}x{height} px ({use}): its inspected region, "
                   f"{100 * self.share:.2f}% of the frame, is thinner than a pixel there; draw it wider")  # fmt: skip
            raise MaskError(msg)

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        """Why a ``height x width`` frame does not fit the mask, its aspect differing from the mask's beyond rounding
        (``ASPECT_TOLERANCE``), as "<width>x<height> but the inspection mask is ..."; None when it fits."""
        mask_h, mask_w = self.inspected.shape
        if abs((width / height) / (mask_w / mask_h) - 1.0) <= ASPECT_TOLERANCE:
            return None
        return (f"{width}x{height} but the inspection mask is {mask_w}x{mask_h}: a mask is drawn over a frame as the "
                "camera delivers it, at any scale of the same aspect")  # fmt: skip

    def check_frame(self, height: int, width: int, name: str) -> None:
        """Raise MaskError naming ``name`` when a ``height x width`` frame does not fit (``aspect_mismatch``)."""
        mismatch = self.aspect_mismatch(height, width)
        if mismatch is not None:
            msg = f"{name} is {mismatch}"
            raise MaskError(msg)

    def check_files(self, paths: Sequence[Path], what: str, name: str = "the model's inspection mask",
                    remedy: str = NOTHING_SCORED) -> None:  # fmt: skip
        """Before any of the image files ``paths`` is fitted or scored: raise MaskError when some do not fit
        (``aspect_mismatch``; scoring would refuse them mid-run), giving their count, the first of them and
        ``remedy``. Sizes come from headers (nothing decoded); a file whose header cannot be read is left to the
        reading, which skips it with a warning. ``what`` names the files in the message ("good images")."""
        mismatched: list[str] = []
        for path in paths:
            shape = image_shape(path)
            mismatch = None if shape is None else self.aspect_mismatch(shape[0], shape[1])
            if mismatch is not None:
                mismatched.append(f"{path} is {mismatch}")
        if mismatched:
            msg = (f"{len(mismatched)} of {len(paths)} {what} do not have the aspect of {name}, e.g. {mismatched[0]}; "
                   f"{remedy}")  # fmt: skip
            raise MaskError(msg)

    def frame_shape(self, image_size: int) -> tuple[int, int]:
        """``(height, width)`` of a frame of the mask's aspect whose longer side is about ``image_size`` (its shorter
        side at least 64 px, so rounding keeps the aspect well within ``ASPECT_TOLERANCE``)."""
        mask_h, mask_w = self.inspected.shape
        scale = max(image_size / max(mask_h, mask_w), 64 / min(mask_h, mask_w))
        return round(mask_h * scale), round(mask_w * scale)

    def save(self, model_dir: Path) -> str:
        """Write the mask into ``model_dir`` as a 0/255 PNG; returns its file name."""
        if not cv2.imwrite(str(model_dir / FILE), np.where(self.inspected, 255, 0).astype(np.uint8)):
            msg = f"cannot write {model_dir / FILE}"
            raise OSError(msg)
        return FILE

    @classmethod
    def load(cls, model_dir: Path) -> InspectionMask:
        path = model_dir / FILE
        grey = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if grey is None or grey.ndim != 2 or grey.dtype != np.uint8 or not np.isin(grey, (0, 255)).all():
            msg = f"{path}: not an inspection mask lineinspect wrote (a 0/255 8-bit grey PNG)"
            raise MaskError(msg)
        try:
            return cls(grey == 255)
        except MaskError as error:
            msg = f"{path}: {error}"
            raise MaskError(msg) from None


def transparent_share(data: bytes) -> float:
    """The share of an encoded image's pixels that are not fully opaque: of its alpha channel (any format and depth
    OpenCV reads, a PNG palette's transparency included) below full, or of a PNG's transparent colour (a tRNS chunk on
    a grey or RGB image, which OpenCV drops). 0.0 for an image without transparency."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is not None and decoded.ndim == 3 and decoded.shape[2] == 4:
        alpha = decoded[..., 3]
        opaque = 1.0 if alpha.dtype.kind == "f" else np.iinfo(alpha.dtype.name).max
        return float((alpha < opaque).mean())
    import PIL.Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # decode_image's limit applied
            with PIL.Image.open(io.BytesIO(data)) as picture:
                if "transparency" not in picture.info:
                    return 0.0
                alpha = np.asarray(picture.convert("RGBA"))[..., 3]
    except (OSError, ValueError):  # a format Pillow does not read: one whose alpha OpenCV reported above, if any
        return 0.0
    return float((alpha < 255).mean())


def input_shares(mask: InspectionMask | None, box: tuple[int, int, int, int], size: int) -> np.ndarray | None:
    """The ``(size, size)`` inspected share of a frame placed at ``box`` = ``(top, left, height, width)`` of the
    square input (padding outside it counts as inspected: it is flat already), or None without a mask."""
    if mask is None:
        return None
    top, left, height, width = box
    if (height, width) == (size, size):  # the frame fills the input (stretched): the cached mask as it is
        return mask.at(size, size)
    shares = np.ones((size, size), np.float32)
    shares[top : top + height, left : left + width] = mask.at(height, width)
    return shares


def apply_to_inputs(batch: torch.Tensor, shares: list[np.ndarray | None]) -> None:
    """Set the ignored pixels of ``batch`` ``(T, 3, S, S)`` to ``FILL`` in place; ``shares[t]`` is row t's
    ``input_shares`` (None: the row is inspected whole). A pixel is ignored when most of it is."""
    for row, row_shares in enumerate(shares):
        if row_shares is not None:
            batch[row][:, torch.from_numpy(row_shares <= 0.5)] = FILL
