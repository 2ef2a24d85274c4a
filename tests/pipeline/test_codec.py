"""Frame/Decision round trips and every CodecError reason the scoring worker dead-letters."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from pipeline.codec import (
    CodecError,
    CodecErrorReason,
    decode_decision,
    decode_frame,
    decode_pixels,
    encode_decision,
    encode_frame,
    encode_pixels,
)
from pipeline.messages import Decision, Frame, StageTimings, error_decision, pack_anomaly_map


def make_frame(**overrides: object) -> Frame:
    fields: dict[str, object] = {
        "line_id": "line-1",
        "camera_id": "cam0",
        "frame_id": "f-1",
        "sequence": 7,
        "captured_at_ns": 123,
        "encoding": "raw",
        "data": bytes(2 * 3 * 3),
        "raw_shape": (2, 3, 3),
        "raw_dtype": "uint8",
        "metadata": {"part": "A-17", "recipe": 3},
    }
    fields.update(overrides)
    return Frame.model_validate(fields)


def test_frame_round_trip_keeps_every_field() -> None:
    frame = make_frame()
    assert decode_frame(encode_frame(frame)) == frame


def test_decision_round_trip_keeps_map_and_timings() -> None:
    size, packed = pack_anomaly_map(np.arange(16, dtype=np.float32).reshape(4, 4))
    decision = Decision(
        frame_id="f-1",
        line_id="line-1",
        camera_id="cam0",
        verdict="fail",
        score=2.5,
        threshold=1.0,
        model_id="abc",
        timings=StageTimings(decode_s=0.01, backbone_s=0.2),
        captured_at_ns=5,
        map_size=size,
        anomaly_map=packed,
    )
    decoded = decode_decision(encode_decision(decision))
    assert decoded == decision
    anomaly_map = decoded.anomaly_map_array()
    assert anomaly_map is not None
    np.testing.assert_array_equal(anomaly_map, np.arange(16, dtype=np.float32).reshape(4, 4))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1\xff garbage", CodecErrorReason.NOT_MSGPACK),
        (msgpack.packb([1, 2, 3]), CodecErrorReason.NOT_A_MESSAGE),
        (msgpack.packb({"version": 99, "frame_id": "x"}), CodecErrorReason.UNKNOWN_VERSION),
        (msgpack.packb({"frame_id": "x"}), CodecErrorReason.UNKNOWN_VERSION),
        (msgpack.packb({"version": 1, "frame_id": "x"}), CodecErrorReason.INVALID_FIELDS),
    ],
)
def test_bad_payloads_raise_typed_reasons(payload: bytes, reason: CodecErrorReason) -> None:
    with pytest.raises(CodecError) as caught:
        decode_frame(payload)
    assert caught.value.reason is reason


def test_oversized_payload_is_rejected_before_unpacking() -> None:
    payload = encode_frame(make_frame(data=bytes(5000), raw_shape=(50, 100), raw_dtype="uint8"))
    with pytest.raises(CodecError) as caught:
        decode_frame(payload, max_bytes=4096)
    assert caught.value.reason is CodecErrorReason.OVERSIZED
    assert decode_frame(payload, max_bytes=len(payload)).frame_id == "f-1"


def test_raw_pixels_decode_to_rgb() -> None:
    pytest.importorskip("models.images")
    image = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    data, extra = encode_pixels(image, "raw")
    np.testing.assert_array_equal(decode_pixels(make_frame(data=data, **extra)), image)


@pytest.mark.parametrize(
    ("shape", "dtype", "n_bytes"),
    [((2, 3, 3), "uint8", 17), ((2, 3, 3), "uint16", 18), ((2, 3, 5), "uint8", 30), ((0, 3), "uint8", 0)],
)
def test_raw_frame_whose_bytes_do_not_match_its_shape(shape: tuple[int, ...], dtype: str, n_bytes: int) -> None:
    pytest.importorskip("models.images")
    with pytest.raises(CodecError) as caught:
        decode_pixels(make_frame(data=bytes(n_bytes), raw_shape=shape, raw_dtype=dtype))
    assert caught.value.reason is CodecErrorReason.RAW_SHAPE_MISMATCH


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_encoded_pixels_decode_back(encoding: str) -> None:
    pytest.importorskip("models.images")
    ramp = np.linspace(60, 180, 32, dtype=np.float32)
    image = np.stack([np.tile(ramp, (24, 1))] * 3, axis=2).astype(np.uint8)
    data, extra = encode_pixels(image, encoding, jpeg_quality=95)  # type: ignore[arg-type]
    decoded = decode_pixels(make_frame(encoding=encoding, data=data, raw_shape=None, raw_dtype=None, **extra))
    assert decoded.shape == image.shape
    tolerance = 0 if encoding == "png" else 12
    assert np.abs(decoded.astype(int) - image.astype(int)).max() <= tolerance


def test_truncated_jpeg_is_undecodable_image() -> None:
    pytest.importorskip("models.images")
    data, _ = encode_pixels(np.full((32, 32, 3), 128, dtype=np.uint8), "jpeg")
    with pytest.raises(CodecError) as caught:
        decode_pixels(make_frame(encoding="jpeg", data=data[:40], raw_shape=None, raw_dtype=None))
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE


def test_error_decision_carries_frame_identity() -> None:
    frame = make_frame()
    decision = error_decision(frame, "stale", "frame was 3 s old")
    assert (decision.verdict, decision.error_reason, decision.frame_id) == ("error", "stale", "f-1")
    assert decision.captured_at_ns == frame.captured_at_ns
    assert decision.metadata == frame.metadata
