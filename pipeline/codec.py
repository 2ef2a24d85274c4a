"""msgpack encoding of Frame and Decision with a schema version, and frame pixel encode/decode.

Every failure to turn bytes back into something usable raises ``CodecError`` carrying a ``CodecErrorReason``;
scoring workers turn it into a dead-letter entry with that reason. Pixels come back as RGB uint8
``(height, width, 3)`` arrays through ``models.images`` (which imports no torch), so a frame decodes exactly as
``lineinspect score`` reads the same file.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

import cv2
import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from pipeline.messages import SCHEMA_VERSION, Decision, Encoding, Frame

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


class CodecError(ValueError):
    """A payload or frame that cannot be decoded; ``reason`` says which check failed."""

    def __init__(self, reason: CodecErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _pack(message: BaseModel) -> bytes:
    packed = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _unpack(payload: bytes, model: type[MessageT], max_bytes: int | None) -> MessageT:
    if max_bytes is not None and len(payload) > max_bytes:
        msg = f"payload is {len(payload)} bytes, limit is {max_bytes} (streams.max_frame_bytes)"
        raise CodecError(CodecErrorReason.OVERSIZED, msg)
    try:
        data: Any = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise CodecError(CodecErrorReason.NOT_MSGPACK, f"payload is not msgpack ({error})") from None
    if not isinstance(data, dict):
        msg = f"payload is msgpack {type(data).__name__}, expected a map with a 'version' key"
        raise CodecError(CodecErrorReason.NOT_A_MESSAGE, msg)
    version = data.get("version")
    if version != SCHEMA_VERSION:
        msg = f"schema version {version!r}; this worker reads version {SCHEMA_VERSION}"
        raise CodecError(CodecErrorReason.UNKNOWN_VERSION, msg)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise CodecError(CodecErrorReason.INVALID_FIELDS, problems) from None


def encode_frame(frame: Frame) -> bytes:
    return _pack(frame)


def decode_frame(payload: bytes, max_bytes: int | None = None) -> Frame:
    """Bytes from the frames stream to a Frame; raises CodecError (oversized, not msgpack, version, fields)."""
    return _unpack(payload, Frame, max_bytes)


def encode_decision(decision: Decision) -> bytes:
    return _pack(decision)


def decode_decision(payload: bytes) -> Decision:
    return _unpack(payload, Decision, None)


def encode_pixels(image_rgb: np.ndarray, encoding: Encoding, jpeg_quality: int = 90) -> tuple[bytes, dict[str, Any]]:
    """RGB uint8 ``(height, width, 3)`` to ``(data, extra Frame fields)`` for the given encoding."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        msg = f"encode_pixels expects RGB uint8 (height, width, 3), got {image_rgb.dtype} {image_rgb.shape}"
        raise ValueError(msg)
    if encoding == "raw":
        return np.ascontiguousarray(image_rgb).tobytes(), {"raw_shape": image_rgb.shape, "raw_dtype": "uint8"}
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        ok, buffer = cv2.imencode(".png", bgr)
    if not ok:
        msg = f"OpenCV could not encode a {image_rgb.shape} image as {encoding}"
        raise ValueError(msg)
    return buffer.tobytes(), {}


def decode_pixels(frame: Frame) -> np.ndarray:
    """The frame's image as RGB uint8 ``(height, width, 3)``; raises CodecError when the pixels are unusable."""
    from models.images import ImageError, decode_image, to_rgb_uint8

    name = f"frame {frame.frame_id}"
    try:
        if frame.encoding != "raw":
            return decode_image(frame.data, name=name)
        return to_rgb_uint8(_raw_array(frame), name=name)
    except ImageError as error:
        raise CodecError(CodecErrorReason.UNDECODABLE_IMAGE, str(error)) from None


def _raw_array(frame: Frame) -> np.ndarray:
    shape, dtype_name = frame.raw_shape, frame.raw_dtype
    if shape is None or dtype_name is None:
        msg = f"raw frame {frame.frame_id} needs raw_shape and raw_dtype"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    valid_rank = len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))
    if not valid_rank or any(side <= 0 for side in shape):
        msg = f"raw frame {frame.frame_id}: shape {shape} is not (height, width) or (height, width, 1|3|4)"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    dtype = np.dtype(dtype_name)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(frame.data) != expected:
        msg = f"raw frame {frame.frame_id}: shape {shape} {dtype_name} needs {expected} bytes, got {len(frame.data)}"
        raise CodecError(CodecErrorReason.RAW_SHAPE_MISMATCH, msg)
    return np.frombuffer(frame.data, dtype=dtype).reshape(shape)
