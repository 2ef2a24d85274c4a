"""Reading and normalising images: any file or byte string in, RGB ``(height, width, 3)`` out.

Frames arrive grayscale, RGB(A), 8- or 16-bit, of any size. Everything that feeds the scorer passes through
``to_rgb`` (RGB of the image's own depth: uint8, or uint16, whose grey levels the scorer keeps when it turns frames
into floats) so that offline scoring (``lineinspect score``) and the streaming worker see identical pixels;
``to_rgb_uint8`` (16-bit scaled by 1/257) is for pictures and estimates that need no more than 8 bits.
No torch here: the pipeline imports this module to decode frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image that cannot be read or converted; the message names the file or frame."""


def to_rgb(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Convert ``(H, W)``, ``(H, W, 1|3|4)`` arrays of uint8/uint16/float to contiguous RGB ``(H, W, 3)`` of their
    own depth: uint8 stays uint8, uint16 stays uint16 (so 10-, 12- or 14-bit camera data stored in 16 bits keeps
    its grey levels until the scorer turns it into floats); floats in [0, 1] become uint8.

    Colour input is taken as RGB (or RGBA).
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        msg = f"{name}: expected a (H, W), (H, W, 3) or (H, W, 4) image, got shape {array.shape}"
        raise ImageError(msg)
    if array.shape[0] < 8 or array.shape[1] < 8:
        msg = f"{name}: image of {array.shape[1]}x{array.shape[0]} pixels is too small (minimum 8x8)"
        raise ImageError(msg)
    if array.dtype.kind == "f":
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype not in (np.uint8, np.uint16):
        msg = f"{name}: unsupported pixel type {array.dtype} (use uint8, uint16 or float in [0, 1])"
        raise ImageError(msg)
    if array.ndim == 2:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_GRAY2RGB)  # ~3x faster than np.repeat
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def to_rgb_uint8(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """``to_rgb``, then 16-bit scaled by 1/257 to RGB uint8 ``(H, W, 3)`` (for pictures and pose estimates)."""
    array = to_rgb(array, name)
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    return array


def full_scale(image: np.ndarray) -> int:
    """The largest value ``image``'s data can hold: 255 for uint8; for uint16 the smallest ``2**bits - 1`` (bits 8,
    10, 12, 14 or 16) at or above its maximum, so 10- or 12-bit camera data stored in 16 bits gets its own range
    (a 16-bit frame darker than 1/16 of its range is taken for 12-bit: only where a frame's own range is wanted)."""
    if image.dtype != np.uint16:
        return 255
    peak = int(image.max()) if image.size else 0
    return next(2**bits - 1 for bits in (8, 10, 12, 14, 16) if peak <= 2**bits - 1)


def to_unit_range(image: np.ndarray, of: np.ndarray | None = None) -> np.ndarray:
    """``image`` as float32 in [0, 1] of the ``full_scale`` of ``of`` (a larger original it was resized from,
    whose maximum decides), else of its own."""
    return image.astype(np.float32) / np.float32(full_scale(image if of is None else of))


def to_uint8_of_own_range(image: np.ndarray) -> np.ndarray:
    """uint8 with a 16-bit image scaled from its own range (``full_scale``: 12-bit data in 16 bits is not shown or
    stored 16 times too dark); uint8 images as they are."""
    if image.dtype != np.uint16:
        return image
    return np.round(to_unit_range(image) * np.float32(255.0)).astype(np.uint8)


def _decoded_to_rgb(decoded: np.ndarray | None, name: str, keep_depth: bool) -> np.ndarray:
    if decoded is None:
        msg = f"{name}: not a readable image (cv2 could not decode it)"
        raise ImageError(msg)
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    elif decoded.ndim == 3 and decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA)
    return to_rgb(decoded, name) if keep_depth else to_rgb_uint8(decoded, name)


def decode_image(data: bytes, name: str = "<bytes>", keep_depth: bool = False) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to RGB uint8 ``(H, W, 3)`` (``keep_depth``: 16-bit images stay uint16, as the
    scorer wants them); raises ImageError naming ``name``."""
    if not data:
        msg = f"{name}: empty image data"
        raise ImageError(msg)
    buffer = np.frombuffer(data, dtype=np.uint8)
    return _decoded_to_rgb(cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED), name, keep_depth)


def read_image(path: Path | str, keep_depth: bool = False) -> np.ndarray:
    """Read an image file to RGB uint8 ``(H, W, 3)`` (``keep_depth``: 16-bit files stay uint16); raises ImageError
    naming the path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        msg = f"{path}: cannot read file ({error.strerror or error})"
        raise ImageError(msg) from None
    return decode_image(data, str(path), keep_depth)


def read_sample(paths: Sequence[Path], count: int, keep_depth: bool = False) -> list[np.ndarray]:
    """Up to ``count`` of the image files, evenly spaced, read as RGB uint8 (``keep_depth`` as ``read_image``);
    unreadable ones are passed over (the caller's other reads report them)."""
    images = []
    for path in list(paths)[:: max(1, len(paths) // count)][:count]:
        try:
            images.append(read_image(path, keep_depth))
        except ImageError:
            continue
    return images


def read_mask(path: Path | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool ``(H, W)`` (pixel >= 128 is defective), optionally resized to (w, h) centre
    on centre. Like ``read_image`` it ignores an EXIF orientation, so a mask lies over its image as stored."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if gray is None:
        msg = f"{path}: not a readable mask image"
        raise ImageError(msg)
    if size is not None:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return gray >= 128


def list_images(directory: Path | str) -> list[Path]:
    """Image files directly in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        msg = f"{directory}: not a directory"
        raise ImageError(msg)
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
