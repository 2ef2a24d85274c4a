"""Reading and normalising images: any file or byte string in, RGB ``(height, width, 3)`` out.

Frames arrive grayscale, RGB(A), 8- or 16-bit, of any size. Everything that feeds the scorer passes through
``to_rgb`` (RGB of the image's own depth: uint8, or uint16, whose grey levels the scorer keeps when it turns frames
into floats) so that offline scoring (``lineinspect score``) and the streaming worker see identical pixels;
``to_rgb_uint8`` (16-bit scaled by 1/257) is for pictures and estimates that need no more than 8 bits.

Files and frames decode the same way (``decode_image`` on their bytes): in their stored orientation, an EXIF
orientation tag ignored (raw frames carry none), alpha dropped. Before decoding, the header is read
(``read_header``): a file announcing more than ``MAX_FILE_PIXELS`` or holding several images (a multi-page TIFF)
is refused, naming the file, rather than decoded whole or read as its first page; so is PNG or JPEG data that does
not hold its whole image (cut short, malformed, or for JPEG missing data inside and for PNG a damaged chunk: both
structures are walked to their end, in ``models.jpeg`` and ``models.png``; bytes after the end are not read).
No torch here: the pipeline imports this module to decode frames.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from models.jpeg import JPEG_SIGNATURE, walk_jpeg
from models.png import PNG_SIGNATURE, walk_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Files announcing more pixels are refused before decoding (an 875 KB PNG of 30000 x 30000 took 3.6 GB to read);
# below Pillow's own refusal (2 x 89.5 MP), which reads the headers of formats other than PNG and JPEG. Stream frames
# have their own limit, ``streams.max_frame_pixels``.
MAX_FILE_PIXELS = 2**27
# Float pixels are read as [0, 1]; this much rounding beyond either end (half an 8-bit grey level) is clipped.
FLOAT_RANGE_SLACK = 0.5 / 255.0


class ImageError(ValueError):
    """An image that cannot be read or converted; the message names the file or frame."""


class ImageTooLargeError(ImageError):
    """An image whose header announces more pixels than allowed; nothing was decoded."""


class Header(NamedTuple):
    """What an encoded image's header says, nothing decoded; for PNG and JPEG also whether the data is whole."""

    width: int
    height: int
    images: int  # pages of a TIFF, frames of an animated WebP; PNG and JPEG are read as one image
    damage: str | None = None  # PNG, JPEG: why the data does not hold the whole image (cut short...), None if it does


def read_header(data: bytes, name: str) -> Header | None:
    """The header of PNG or JPEG data (parsed here, and the data's structure checked to its end: ``damage``) or of
    another format Pillow knows (it reads headers only), or None when none can be read (cv2 may still decode the
    data, up to its own limit of 2**30 pixels). Raises ImageError for PNG or JPEG data whose size cannot be read, and
    ImageTooLargeError for a header beyond Pillow's own decompression-bomb limit."""
    if data.startswith(JPEG_SIGNATURE) or data.startswith(PNG_SIGNATURE):
        layout = walk_jpeg(data) if data.startswith(JPEG_SIGNATURE) else walk_png(data)
        if layout.size is None:
            msg = f"{name}: {layout.problem}"
            raise ImageError(msg)
        return Header(layout.size[0], layout.size[1], 1, layout.problem)
    import PIL.Image  # headers of TIFF, BMP, WebP...; not needed for stream frames (PNG and JPEG)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # MAX_FILE_PIXELS decides
            with PIL.Image.open(io.BytesIO(data)) as image:
                return Header(image.size[0], image.size[1], int(getattr(image, "n_frames", 1)))
    except PIL.Image.DecompressionBombError as error:
        msg = f"{name}: {error}"
        raise ImageTooLargeError(msg) from None
    except Exception:  # anything Pillow cannot parse is left to cv2, which names no reason either
        return None


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
        array = _unit_floats_to_uint8(array, name)
    elif array.dtype not in (np.uint8, np.uint16):
        msg = f"{name}: unsupported pixel type {array.dtype} (use uint8, uint16 or float in [0, 1])"
        raise ImageError(msg)
    if array.ndim == 2:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_GRAY2RGB)  # ~3x faster than np.repeat
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _unit_floats_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Floats in [0, 1] to uint8; other floats are an ImageError rather than clipped (a float image of 0-255 grey
    levels would come out white)."""
    if not np.isfinite(array).all():
        msg = f"{name}: has float pixels that are not a number (NaN) or infinite; no grey level can stand for them"
        raise ImageError(msg)
    low, high = float(array.min()), float(array.max())
    if low < -FLOAT_RANGE_SLACK or high > 1.0 + FLOAT_RANGE_SLACK:
        msg = (f"{name}: float pixels span [{low:g}, {high:g}], but floats are read as 0 (black) to 1 (white): "
               "scale them to [0, 1] or save the image as 8- or 16-bit")  # fmt: skip
        raise ImageError(msg)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


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


def decode_image(data: bytes, name: str = "<bytes>", keep_depth: bool = False,
                 max_pixels: int | None = MAX_FILE_PIXELS) -> np.ndarray:  # fmt: skip
    """Decode JPEG/PNG/... bytes to RGB uint8 ``(H, W, 3)`` (``keep_depth``: 16-bit images stay uint16, as the
    scorer wants them); raises ImageError naming ``name``. The header is read first: more than ``max_pixels`` (None:
    checked by the caller) raises ImageTooLargeError; several images (a multi-page TIFF), or PNG or JPEG data not
    holding its whole image (``Header.damage``), ImageError."""
    if not data:
        msg = f"{name}: empty image data"
        raise ImageError(msg)
    header = read_header(data, name)
    if header is not None and header.images > 1:
        msg = (f"{name}: holds {header.images} images (pages), and lineinspect reads one image per file: only the "
               "first would be scored; save each page as its own file")  # fmt: skip
        raise ImageError(msg)
    if header is not None and max_pixels is not None and header.width * header.height > max_pixels:
        pixels = header.width * header.height
        msg = (f"{name}: {header.width}x{header.height} is {pixels} pixels, more than the {max_pixels} an image may "
               "hold; refused before decoding (scale it down if it is a real picture)")  # fmt: skip
        raise ImageTooLargeError(msg)
    if header is not None and header.damage is not None:  # checked after the size: a header alone is too large
        msg = f"{name}: {header.damage}"
        raise ImageError(msg)
    buffer = np.frombuffer(data, dtype=np.uint8)
    return _decoded_to_rgb(cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED), name, keep_depth)


def read_image(path: Path | str, keep_depth: bool = False, max_pixels: int | None = MAX_FILE_PIXELS) -> np.ndarray:
    """Read an image file to RGB uint8 ``(H, W, 3)`` (``keep_depth``: 16-bit files stay uint16); raises ImageError
    naming the path (``decode_image``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        msg = f"{path}: cannot read file ({error.strerror or error})"
        raise ImageError(msg) from None
    return decode_image(data, str(path), keep_depth, max_pixels)


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
    """Read a ground-truth mask as bool ``(H, W)``, optionally resized to (w, h) centre on centre. A pixel is
    defective where any colour channel reaches 128 (of 255; 16-bit masks scaled), so a pure red or blue annotation
    counts; alpha is ignored. Read as ``read_image`` reads files (its EXIF orientation ignored), so a mask lies over
    its image as stored. A mask with marks but none reaching 128 (a 0/1 label image, 8- or 16-bit) is an ImageError,
    not an empty mask."""
    try:
        colour = read_image(path, keep_depth=True)  # the check below sees a 16-bit mask's own values
    except ImageError as error:
        msg = f"not a readable mask image: {error}"
        raise ImageError(msg) from None
    marked = to_rgb_uint8(colour).max(axis=2) >= 128
    peak = int(colour.max())
    if peak > 0 and not marked.any():
        full = np.iinfo(colour.dtype).max
        msg = (f"{path}: the mask's brightest pixel is {peak} (of {full}), so no pixel is marked defective (half of "
               f"{full} or more); save masks as 0 (good) and {full} (defective)")  # fmt: skip
        raise ImageError(msg)
    return marked if size is None else resize_mask(marked, size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool mask ``(H, W)`` -> bool ``(h, w)`` for ``size = (w, h)``, by nearest neighbour centre on centre (cv2's
    ``INTER_NEAREST`` moves content half an output pixel down and right)."""
    if mask.shape == (size[1], size[0]):
        return mask.astype(bool, copy=False)
    resized = cv2.resize(
        np.ascontiguousarray(mask, dtype=bool).view(np.uint8), size, interpolation=cv2.INTER_NEAREST_EXACT
    )
    return resized.view(bool)


def list_images(directory: Path | str) -> list[Path]:
    """Image files directly in ``directory`` (by suffix, any case; symlinks to files too), sorted by name. Hidden
    files are left out: macOS copies put an AppleDouble ``._name.jpg``, not an image, beside every image."""
    directory = Path(directory)
    if not directory.is_dir():
        msg = f"{directory}: not a directory"
        raise ImageError(msg)
    return sorted(
        path
        for path in directory.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
