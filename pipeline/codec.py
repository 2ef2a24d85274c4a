"""msgpack encoding of Frame and Decision with a schema version, and frame pixel encode/decode.

Every failure to turn bytes back into something usable raises ``CodecError`` carrying a ``CodecErrorReason``;
scoring workers turn it into a dead-letter entry with that reason. Pixels come back as RGB uint8
``(height, width, 3)`` arrays through ``models.images`` (which imports no torch), so a frame decodes exactly as
``lineinspect score`` reads the same file. Nothing a frame carries gets past ``decode_pixels`` as another
exception: its size is checked from the PNG/JPEG header or the raw shape before any pixel buffer is allocated.
Nor does any payload get past ``decode_frame`` as another exception, or cost more than a bounded amount of memory
and time: msgpack arrays and maps of more than ``MAX_CONTAINER_ITEMS`` items are refused before they are built
(``tests/pipeline/test_codec_fuzz.py`` fuzzes both).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
from enum import StrEnum
from typing import Any, TypeVar

import cv2
import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from pipeline.messages import (
    CONTROL_CHARACTER,
    RECORDED_BEFORE_WIRE_TYPES,
    SCHEMA_VERSION,
    Decision,
    Encoding,
    Frame,
    FrameRef,
    brief_repr,
    id_problem,
)

MessageT = TypeVar("MessageT", bound=BaseModel)


class CodecErrorReason(StrEnum):
    """Why a payload could not be used; the value is the dead-letter ``reason`` field."""

    NOT_MSGPACK = "not_msgpack"
    NOT_A_MESSAGE = "not_a_message"
    UNKNOWN_VERSION = "unknown_schema_version"
    INVALID_FIELDS = "invalid_fields"
    OVERSIZED = "oversized_frame"
    UNDECODABLE_IMAGE = "undecodable_image"
    RAW_SHAPE_MISMATCH = "raw_shape_mismatch"
    IMAGE_TOO_LARGE = "image_too_large"


class CodecError(ValueError):
    """A payload or frame that cannot be decoded; ``reason`` says which check failed."""

    def __init__(self, reason: CodecErrorReason, detail: str) -> None:
        detail = _printable(detail)  # it goes into a dead letter and an error decision, both UTF-8
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _printable(text: str) -> str:
    """``text`` as UTF-8 holds it: bytes the lenient unpacking kept as lone surrogates (``surrogateescape``) are shown
    as ``\\xff``, as the producer sent them (redis-py and msgpack refuse to encode a lone surrogate)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate surrogateescape does not make
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Items a msgpack array or map in a message may hold (a Frame's map has 11 fields, its metadata at most
# messages.MAX_METADATA_ENTRIES, its one array, raw_shape, 2 or 3 sides); a payload holding a larger one is
# not_msgpack, refused before any of it is built. msgpack allocates an array's declared length before reading its
# items and by default takes any length up to the payload's size: 1,000 nested headers declaring 5,000 items each (a
# 25 kB payload) allocated 82 MB and took 0.2 s; a 1 MB raw_shape of 1M strings took 4 s and 1.3 GB for pydantic's 1M
# errors; a map of 1M keys (7 MB) 0.9 s to build.
MAX_CONTAINER_ITEMS = 1024
_CONTAINER_LIMITS = {"max_array_len": MAX_CONTAINER_ITEMS, "max_map_len": MAX_CONTAINER_ITEMS}
# Problems an invalid_fields detail names per field, at most (pydantic reports one per bad item of raw_shape).
MAX_PROBLEMS_PER_FIELD = 3


def _pack(message: BaseModel) -> bytes:
    packed = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _unpack(
    payload: bytes, model: type[MessageT], max_bytes: int | None, context: dict[str, Any] | None = None
) -> MessageT:
    if max_bytes is not None and len(payload) > max_bytes:
        msg = f"payload is {len(payload)} bytes, limit is {max_bytes} (streams.max_frame_bytes)"
        raise CodecError(CodecErrorReason.OVERSIZED, msg)
    try:
        data: Any = msgpack.unpackb(payload, raw=False, strict_map_key=True, **_CONTAINER_LIMITS)
    except Exception as error:  # msgpack raises ValueError subclasses, TypeError (unhashable keys), RecursionError
        why = str(error) or type(error).__name__
        msg = f"payload of {len(payload)} bytes starting {payload[:16]!r} is not msgpack ({why})"
        data = _unpack_leniently(payload)  # msgpack after all, with a key that is not str or a str that is not UTF-8?
        if data is None:
            raise CodecError(CodecErrorReason.NOT_MSGPACK, msg) from None
        if isinstance(data, dict) and type(data.get("version")) is int and data["version"] == SCHEMA_VERSION:
            not_utf8 = _not_utf8(data)
            if not_utf8:
                raise CodecError(CodecErrorReason.INVALID_FIELDS, "; ".join(not_utf8)) from None
        _checked(data, model, context)  # raises the CodecError that names the field (or the version, or not a map)
        raise CodecError(CodecErrorReason.NOT_MSGPACK, msg) from None  # no field's problem after all
    return _checked(data, model, context)


def _checked(data: Any, model: type[MessageT], context: dict[str, Any] | None = None) -> MessageT:
    """The message ``data`` (unpacked msgpack) holds; CodecError saying why when it holds none."""
    if not isinstance(data, dict):
        msg = f"payload is msgpack {type(data).__name__}, expected a map with a 'version' key"
        raise CodecError(CodecErrorReason.NOT_A_MESSAGE, msg)
    version = data.get("version")
    if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and True equal 1 but are not version 1
        msg = f"schema version {brief_repr(version)}; this worker reads version {SCHEMA_VERSION}"
        raise CodecError(CodecErrorReason.UNKNOWN_VERSION, msg)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        raise CodecError(CodecErrorReason.INVALID_FIELDS, validation_problems(error)) from None


def validation_problems(error: ValidationError) -> str:
    """An ``invalid_fields`` detail: each problem as ``field: why``, at most ``MAX_PROBLEMS_PER_FIELD`` per field."""
    problems, per_field = [], collections.Counter[Any]()
    for problem in error.errors(include_url=False):
        per_field[problem["loc"][:1]] += 1
        if per_field[problem["loc"][:1]] <= MAX_PROBLEMS_PER_FIELD:
            problems.append(f"{_path_name(problem['loc'])}: {problem['msg']}")
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _unpack_leniently(payload: bytes) -> Any:
    """``payload`` unpacked with any map key and invalid UTF-8 in str kept (as surrogates), or None when that fails
    too: only to name the field of a payload the strict unpacking refused."""
    try:
        return msgpack.unpackb(
            payload, raw=False, strict_map_key=False, unicode_errors="surrogateescape", **_CONTAINER_LIMITS
        )
    except Exception:
        return None


# The values _not_utf8 looks at, at most: a Frame holds a dozen and its metadata a few more; a payload holding
# millions (a 16 MiB array) would cost seconds and gigabytes of paths in Python, on the scorer's hot path.
MAX_WALKED_VALUES = 10_000


def _not_utf8(data: Any, limit: int = 5) -> list[str]:
    """Where a leniently unpacked payload holds msgpack str that is not UTF-8 (``metadata.lot: ...``), at most
    ``limit`` of them among its first ``MAX_WALKED_VALUES`` values; the top-level ``data`` is left to the model,
    which refuses any str there."""
    found: list[str] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    walked = 0
    while stack and len(found) < limit and walked < MAX_WALKED_VALUES:
        path, value = stack.pop()
        walked += 1
        room = max(0, MAX_WALKED_VALUES - walked - len(stack))  # children beyond it would never be looked at
        if isinstance(value, str) and path != ("data",) and _has_surrogates(value):
            found.append(f"{_path_name(path)}: msgpack str that is not UTF-8 (send bytes as bin, text as UTF-8)")
        elif isinstance(value, dict):
            for key, item in itertools.islice(value.items(), room):
                if isinstance(key, str) and _has_surrogates(key):
                    found.append(f"{_path_name(path)}: a key is msgpack str that is not UTF-8")
                stack.append(((*path, key), item))
        elif isinstance(value, list | tuple):
            stack.extend(((*path, index), item) for index, item in enumerate(value[:room]))
    return found[:limit]


def _path_name(path: tuple[Any, ...]) -> str:
    """``metadata.lot`` for the keys and indexes leading to a value (each key cut to 40 characters), or ``payload``."""
    return ".".join(f"{part!s:.40}" for part in path) or "payload"


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode_frame(frame: Frame) -> bytes:
    return _pack(frame)


def decode_frame(payload: bytes, max_bytes: int | None = None) -> Frame:
    """Bytes from the frames stream to a Frame; raises CodecError (oversized, not msgpack, version, fields)."""
    return _unpack(payload, Frame, max_bytes)


def decode_recorded_frame(payload: bytes) -> Frame:
    """A frame from a recording (``workers.record``): as ``decode_frame``, but taking the msgpack types lineinspect
    took before it checked them (text and metadata as bin, ``data`` as str), which recordings made then may hold;
    a replay sends such a frame with the documented types."""
    return _unpack(payload, Frame, None, {RECORDED_BEFORE_WIRE_TYPES: True})


# Characters of a refused id a stand-in keeps readable (with ``~`` and ``ID_HASH_CHARS`` of the id's hash).
STAND_IN_PREFIX_CHARS = 64
ID_HASH_CHARS = 16


def peek_frame_ref(payload: bytes | None, line_id: str, received_at_ns: int) -> FrameRef | None:
    """Best effort, for a payload ``decode_frame`` rejected: what it says about the frame's identity, or None when
    it holds no ``frame_id`` (a non-empty string in a msgpack map). Fields that are missing, of the wrong type or no
    valid id (``messages.id_problem``) fall back to ``line_id``, camera ``unknown``, sequence 0 and
    ``received_at_ns``; a ``frame_id`` that is no valid id (over ``MAX_ID_CHARS``, a control character) is named by
    a stand-in (``stand_in_id``), so its frame still gets an error decision without the decision, its Redis key or
    a log line carrying the id. Reads the map's keys one by one, skipping values, so an oversized payload is never
    unpacked whole."""
    fields = _peek_fields(payload or b"", ("frame_id", "line_id", "camera_id", "sequence", "captured_at_ns"))
    frame_id = fields.get("frame_id")
    if not isinstance(frame_id, str) or not frame_id:
        return None

    def text(key: str, default: str) -> str:
        value = fields.get(key)
        return value if isinstance(value, str) and value and id_problem(value) is None else default

    def count(key: str, default: int) -> int:
        value = fields.get(key)
        return value if type(value) is int and value >= 0 else default

    return FrameRef(
        frame_id=frame_id if id_problem(frame_id) is None else stand_in_id(frame_id),
        line_id=text("line_id", line_id),
        camera_id=text("camera_id", "unknown"),
        sequence=count("sequence", 0),
        captured_at_ns=count("captured_at_ns", received_at_ns),
        metadata={},  # not trusted: the payload failed validation
    )


def stand_in_id(frame_id: str) -> str:
    """A valid id naming ``frame_id``, which is none: its first ``STAND_IN_PREFIX_CHARS`` characters (control
    characters as ``_``), ``~`` and a hash of the whole id, so two refused ids never share a stand-in."""
    digest = hashlib.sha256(frame_id.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HASH_CHARS]
    readable = CONTROL_CHARACTER.sub("_", frame_id[:STAND_IN_PREFIX_CHARS])
    return f"{readable}~{digest}"


def _peek_fields(payload: bytes, wanted: tuple[str, ...]) -> dict[str, Any]:
    """The ``wanted`` top-level keys of a msgpack map payload, as far as it can be read (stops at the first error,
    and after ``MAX_CONTAINER_ITEMS`` keys)."""
    found: dict[str, Any] = {}
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=False, max_buffer_size=max(len(payload), 1), **_CONTAINER_LIMITS
    )
    try:
        unpacker.feed(payload)
        for _ in range(min(unpacker.read_map_header(), MAX_CONTAINER_ITEMS)):  # a Frame's map has 11 keys
            key = unpacker.unpack()
            if isinstance(key, str) and key in wanted:
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:  # whatever stops the reading, keep what was read before it
        pass
    return found


def encode_decision(decision: Decision) -> bytes:
    return _pack(decision)


def decode_decision(payload: bytes) -> Decision:
    return _unpack(payload, Decision, None)


def encode_pixels(image_rgb: np.ndarray, encoding: Encoding, jpeg_quality: int = 90) -> tuple[bytes, dict[str, Any]]:
    """RGB ``(height, width, 3)`` or grey ``(height, width)``, uint8 or uint16, to ``(data, extra Frame fields)`` for
    the given encoding; PNG and raw keep 16 bits (a grey frame stays one channel: a third of the bytes), JPEG holds
    8 bits and refuses 16-bit frames rather than drop their grey levels."""
    shape_ok = image_rgb.ndim == 2 or (image_rgb.ndim == 3 and image_rgb.shape[2] == 3)
    if not shape_ok or image_rgb.dtype not in (np.uint8, np.uint16):
        msg = ("encode_pixels expects RGB or grey, uint8 or uint16 ((height, width, 3) or (height, width)), got "
               f"{image_rgb.dtype} {image_rgb.shape}")  # fmt: skip
        raise ValueError(msg)
    if encoding == "jpeg" and image_rgb.dtype == np.uint16:
        msg = "JPEG holds 8 bits: encode 16-bit frames as png or raw"
        raise ValueError(msg)
    if encoding == "raw":
        extra = {"raw_shape": image_rgb.shape, "raw_dtype": str(image_rgb.dtype)}
        return np.ascontiguousarray(image_rgb).tobytes(), extra
    bgr = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        ok, buffer = cv2.imencode(".png", bgr)
    if not ok:
        msg = f"OpenCV could not encode a {image_rgb.shape} image as {encoding}"
        raise ValueError(msg)
    return buffer.tobytes(), {}


def decode_pixels(frame: Frame, max_pixels: int | None = None) -> np.ndarray:
    """The frame's image as RGB ``(height, width, 3)``, uint8 or (16-bit frames) uint16, as ``lineinspect score``
    reads the same file; raises CodecError when the pixels are unusable.

    ``max_pixels`` (``streams.max_frame_pixels``) bounds width x height, checked from the PNG/JPEG header or the raw
    shape before decoding. Encoded data must be a PNG or a JPEG (either, whatever ``encoding`` says): cv2 would also
    decode TIFF, WebP and more, whose sizes are not checked here and whose pixel types it cannot always convert.
    Any other failure while decoding becomes an ``undecodable_image`` CodecError for this frame alone.
    """
    from models.images import ImageError, ImageTooLargeError, decode_image, to_rgb

    name = f"frame {frame.frame_id}"
    try:
        if frame.encoding != "raw":
            _check_png_or_jpeg(frame)
            return decode_image(frame.data, name=name, keep_depth=True, max_pixels=max_pixels)  # the line's limit
        return to_rgb(_raw_array(frame, max_pixels), name=name)
    except CodecError:
        raise
    except ImageTooLargeError as error:
        raise CodecError(CodecErrorReason.IMAGE_TOO_LARGE, f"{error}; the limit is streams.max_frame_pixels") from None
    except ImageError as error:
        raise CodecError(CodecErrorReason.UNDECODABLE_IMAGE, str(error)) from None
    except Exception as error:  # cv2.error, MemoryError...: one frame's pixels must never fail its batch
        msg = f"{name}: {frame.encoding} data could not be decoded ({type(error).__name__}: {error})"
        raise CodecError(CodecErrorReason.UNDECODABLE_IMAGE, msg) from None


def _check_png_or_jpeg(frame: Frame) -> None:
    """Raise CodecError unless ``frame.data`` starts as a PNG or a JPEG, the formats whose headers ``decode_image``
    reads itself (size, and whether the data is whole) before decoding."""
    from models.images import PNG_SIGNATURE
    from models.jpeg import JPEG_SIGNATURE

    data = frame.data
    if not data:
        msg = f"frame {frame.frame_id}: {frame.encoding} data is empty (0 bytes)"
        raise CodecError(CodecErrorReason.UNDECODABLE_IMAGE, msg)
    if not data.startswith(PNG_SIGNATURE) and not data.startswith(JPEG_SIGNATURE):
        msg = f"frame {frame.frame_id}: {frame.encoding} data is neither PNG nor JPEG (starts {data[:8]!r})"
        raise CodecError(CodecErrorReason.UNDECODABLE_IMAGE, msg)


def _check_pixels(frame: Frame, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        msg = (
            f"frame {frame.frame_id}: {width}x{height} is {width * height} pixels, "
            f"limit is {max_pixels} (streams.max_frame_pixels)"
        )
        raise CodecError(CodecErrorReason.IMAGE_TOO_LARGE, msg)


def _raw_array(frame: Frame, max_pixels: int | None) -> np.ndarray:
    shape, dtype_name = frame.raw_shape, frame.raw_dtype
    if shape is None or dtype_name is None:
        msg = f"raw frame {frame.frame_id} needs raw_shape and raw_dtype"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    valid_rank = len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))
    if not valid_rank or any(side <= 0 for side in shape):
        msg = f"raw frame {frame.frame_id}: shape {shape} is not (height, width) or (height, width, 1|3|4)"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    _check_pixels(frame, shape[1], shape[0], max_pixels)
    dtype = np.dtype(dtype_name)
    expected = math.prod(shape) * dtype.itemsize  # Python ints: np.prod wraps around int64 (2**32 x 2**32 x 3 -> 0)
    if len(frame.data) != expected:
        msg = f"raw frame {frame.frame_id}: shape {shape} {dtype_name} needs {expected} bytes, got {len(frame.data)}"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    return np.frombuffer(frame.data, dtype=dtype).reshape(shape)
