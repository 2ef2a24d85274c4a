"""Frame/Decision round trips and every CodecError reason the scoring worker dead-letters."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
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


def test_error_decision_carries_frame_identity() -> None:
    frame = make_frame()
    decision = error_decision(frame, "stale", "frame was 3 s old")
    assert (decision.verdict, decision.error_reason, decision.frame_id) == ("error", "stale", "f-1")
    assert decision.captured_at_ns == frame.captured_at_ns
    assert decision.metadata == frame.metadata


def png_announcing(width: int, height: int, bit_depth: int, idat_bytes: int) -> bytes:
    """A PNG whose IHDR announces ``width`` x ``height`` RGB pixels, followed by ``idat_bytes`` of zero data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(idat_bytes)))
        + chunk(b"IEND", b"")
    )


def encoded_frame(data: bytes, encoding: str = "png") -> Frame:
    return make_frame(encoding=encoding, data=data, raw_shape=None, raw_dtype=None)


def test_a_gigapixel_png_is_rejected_from_its_header() -> None:
    pytest.importorskip("models.images")
    data = png_announcing(32_000, 32_000, bit_depth=16, idat_bytes=300_000_000)  # ~300 kB: would decode to 6 GB
    assert len(data) < 3_000_000
    with pytest.raises(CodecError) as caught:
        decode_pixels(encoded_frame(data), max_pixels=50_000_000)
    assert caught.value.reason is CodecErrorReason.IMAGE_TOO_LARGE
    assert "32000x32000" in caught.value.detail and "streams.max_frame_pixels" in caught.value.detail


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_size_is_read_from_its_frame_header(progressive: bool) -> None:
    import cv2

    pytest.importorskip("models.images")
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]  # progressive: SOF2 instead of SOF0
    ok, buffer = cv2.imencode(".jpg", np.full((24, 40, 3), 90, np.uint8), flags)
    assert ok
    frame = encoded_frame(buffer.tobytes(), "jpeg")
    assert decode_pixels(frame, max_pixels=40 * 24).shape == (24, 40, 3)
    with pytest.raises(CodecError) as caught:
        decode_pixels(frame, max_pixels=40 * 24 - 1)
    assert caught.value.reason is CodecErrorReason.IMAGE_TOO_LARGE and "40x24" in caught.value.detail


def test_raw_shapes_whose_size_wraps_around_int64_are_rejected() -> None:
    pytest.importorskip("models.images")
    frame = make_frame(data=b"", raw_shape=(2**32, 2**32, 3), raw_dtype="uint8")  # np.prod of it is 0
    with pytest.raises(CodecError) as caught:
        decode_pixels(frame)
    assert caught.value.reason is CodecErrorReason.RAW_SHAPE_MISMATCH
    with pytest.raises(CodecError) as caught:
        decode_pixels(frame, max_pixels=50_000_000)
    assert caught.value.reason is CodecErrorReason.IMAGE_TOO_LARGE


WITH_ALPHA = np.dstack([np.full((16, 20, 3), 50, np.uint8), np.full((16, 20), 200, np.uint8)])


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((16, 20, 3), 257 * 100, np.uint16), np.full((16, 20, 3), 257 * 100, np.uint16)),  # keeps 16 bits
        (np.full((16, 20), 77, np.uint8), np.full((16, 20, 3), 77, np.uint8)),  # grey
        (WITH_ALPHA, np.full((16, 20, 3), 50, np.uint8)),  # the alpha channel is dropped
    ],
)
def test_16_bit_grey_and_alpha_pngs_still_decode(image: np.ndarray, expected: np.ndarray) -> None:
    import cv2

    pytest.importorskip("models.images")
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    np.testing.assert_array_equal(decode_pixels(encoded_frame(buffer.tobytes()), max_pixels=320), expected)


def test_data_that_is_neither_png_nor_jpeg_is_undecodable() -> None:
    import cv2

    pytest.importorskip("models.images")
    ok, tiff = cv2.imencode(".tiff", np.full((64, 64, 3), 0.5, np.float64))  # cv2 decodes it, then cannot convert
    assert ok
    with pytest.raises(CodecError) as caught:
        decode_pixels(encoded_frame(tiff.tobytes()))
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE
    assert "neither PNG nor JPEG" in caught.value.detail


def test_any_failure_while_decoding_pixels_is_a_codec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    images = pytest.importorskip("models.images")

    def explode(data: bytes, name: str = "", keep_depth: bool = False, max_pixels: int | None = None) -> np.ndarray:
        raise MemoryError("out of memory")

    monkeypatch.setattr(images, "decode_image", explode)
    data, _ = encode_pixels(np.full((16, 16, 3), 9, np.uint8), "png")
    with pytest.raises(CodecError) as caught:
        decode_pixels(encoded_frame(data))
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE and "MemoryError" in caught.value.detail


def test_not_msgpack_detail_says_what_was_wrong() -> None:
    with pytest.raises(CodecError) as caught:
        decode_frame(b"\xc1\xff garbage")
    assert "()" not in caught.value.detail and "FormatError" in caught.value.detail
    assert "\\xc1" in caught.value.detail


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"version": 1.0}, CodecErrorReason.UNKNOWN_VERSION),
        ({"version": True}, CodecErrorReason.UNKNOWN_VERSION),
        ({"sequence": "5"}, CodecErrorReason.INVALID_FIELDS),
        ({"sequence": True}, CodecErrorReason.INVALID_FIELDS),
        ({"captured_at_ns": 1.5}, CodecErrorReason.INVALID_FIELDS),
        ({"raw_shape": ["2", 3, 3]}, CodecErrorReason.INVALID_FIELDS),
    ],
)
def test_numbers_of_the_wrong_type_are_not_coerced(overrides: dict[str, object], reason: CodecErrorReason) -> None:
    fields = msgpack.unpackb(encode_frame(make_frame())) | overrides
    with pytest.raises(CodecError) as caught:
        decode_frame(msgpack.packb(fields))
    assert caught.value.reason is reason
    assert decode_frame(encode_frame(make_frame())).raw_shape == (2, 3, 3)  # lists from msgpack are still tuples


def test_frame_model_rejects_a_float_version() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="schema version must be an integer"):
        make_frame(version=1.0)


def test_peek_frame_ref_names_a_rejected_frame_when_it_can() -> None:
    from pipeline.codec import peek_frame_ref

    payload = msgpack.packb({"version": 2, "camera_id": "cam3", "data": bytes(5000), "frame_id": "v2", "sequence": 4})
    ref = peek_frame_ref(payload, "line-1", received_at_ns=99)
    assert ref is not None
    assert ref == ("v2", "line-1", "cam3", 4, 99, {})
    stray = peek_frame_ref(msgpack.packb({"frame_id": "x", "line_id": "line-2", "sequence": "7"}), "line-1", 0)
    assert stray is not None and (stray.line_id, stray.sequence) == ("line-2", 0)
    unnamed_payloads = [msgpack.packb([1, 2]), msgpack.packb({"frame_id": 5}), msgpack.packb({"frame_id": ""})]
    for unnamed in [b"\xc1\xff", *unnamed_payloads]:
        assert peek_frame_ref(unnamed, "line-1", 0) is None
    assert peek_frame_ref(payload[:-3], "line-1", 0) is not None  # truncated after the id: still named


def test_jpeg_refuses_16_bit_frames_rather_than_drop_their_grey_levels() -> None:
    with pytest.raises(ValueError, match="JPEG holds 8 bits"):
        encode_pixels(np.zeros((16, 16, 3), np.uint16), "jpeg")
    grey = np.full((16, 16), 4095, np.uint16)
    data, extra = encode_pixels(grey, "raw")
    assert extra == {"raw_shape": (16, 16), "raw_dtype": "uint16"} and len(data) == 16 * 16 * 2


def test_an_empty_frame_says_it_is_empty() -> None:
    pytest.importorskip("models.images")
    with pytest.raises(CodecError) as caught:
        decode_pixels(encoded_frame(b"", "jpeg"))
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE
    assert caught.value.detail == "frame f-1: jpeg data is empty (0 bytes)"


def _stored_files(directory: Path) -> list[Path]:
    """Files as an integrator's folder holds them, each written by another library than OpenCV where it can."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    rgb[:, :20] = (200, 30, 30)  # a red band: a channel swap or a rotation would show
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(directory / "exif_rotated.jpg", quality=95, exif=exif)
    Image.fromarray(rgb).convert("CMYK").save(directory / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).quantize(16).save(directory / "palette_transparent.png", transparency=0)
    Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA").save(directory / "grey_alpha.png")
    Image.fromarray(rgb[..., 0] > 128).save(directory / "one_bit.png")
    opaque = np.full((40, 64, 1), 65535, np.uint16)
    cv2.imwrite(str(directory / "rgba_16_bit.png"), np.concatenate([rgb[..., ::-1] * np.uint16(257), opaque], axis=2))
    Image.fromarray(rgb).save(directory / "pièce_部品.jpg", quality=90)
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8 + b"\xff\xda" + bytes(range(256)) * 8
    (directory / "motion_photo.jpg").write_bytes((directory / "pièce_部品.jpg").read_bytes() + video)  # FF DA, no FF D9
    return sorted(directory.iterdir())


def test_a_streamed_file_decodes_to_the_pixels_read_from_the_file(tmp_path: Path) -> None:
    # a model fitted on files and fed the same files' bytes as frames must see the same pixels: stored orientation
    # (an EXIF rotation ignored on both paths), CMYK, palette, alpha and 16-bit files alike
    images = pytest.importorskip("models.images")
    for path in _stored_files(tmp_path):
        encoding = "jpeg" if path.suffix == ".jpg" else "png"
        streamed = decode_pixels(encoded_frame(path.read_bytes(), encoding), max_pixels=50_000_000)
        offline = images.read_image(path, keep_depth=True)
        assert streamed.shape == offline.shape == (40, 64, 3), path.name
        assert streamed.dtype == offline.dtype and np.array_equal(streamed, offline), path.name
        if path.name in ("exif_rotated.jpg", "palette_transparent.png", "rgba_16_bit.png"):
            assert images.to_rgb_uint8(streamed)[:, :20].mean(axis=(0, 1))[0] > 150, path.name  # red stays red


def _broken_jpeg_frames() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), (5, 5), 0)
    data, _ = encode_pixels(image, "jpeg")
    restarting = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes()
    third, fifth = (restarting.index(bytes([0xFF, code])) for code in (0xD2, 0xD4))
    return {
        r"ends inside the entropy-coded data of its scan 1 .*: truncated": data[: len(data) * 2 // 3],
        r"ends inside its DQT segment at byte 20 .*: truncated": data[:40],
        r"a second start-of-image marker \(FF D8\) at byte \d+": data[: len(data) // 2] + data,
        r"damaged inside its scan 1: restart marker RST4 at byte \d+ where RST2 is due": (
            restarting[:third] + restarting[fifth:]  # two restart intervals lost, the end intact
        ),
    }


@pytest.mark.parametrize("why", list(_broken_jpeg_frames()))
def test_a_jpeg_frame_cut_short_or_broken_is_dead_lettered_saying_why(why: str) -> None:
    # OpenCV decodes each of these with a warning on stderr and grey or shifted blocks where data is missing
    pytest.importorskip("models.images")
    with pytest.raises(CodecError) as caught:
        decode_pixels(encoded_frame(_broken_jpeg_frames()[why], "jpeg"))
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE
    assert re.match(f"frame f-1: JPEG .*{why}", caught.value.detail), caught.value.detail


@pytest.mark.parametrize(
    ("overrides", "use_bin_type", "named"),
    [
        ({"metadata": {5: "x"}}, True, "metadata: Value error, key 5 is msgpack int; metadata keys must be str"),
        ({"metadata": {b"lot": "x"}}, True, "metadata: Value error, key b'lot' is msgpack bin"),
        ({"metadata": {"lot": b"A7"}}, True, "metadata: Value error, 'lot' is msgpack bin"),
        ({7: "x"}, True, "7: "),
        ({"frame_id": b"f-1"}, True, "frame_id: Value error, msgpack bin, expected str"),
        ({"camera_id": b"cam0"}, True, "camera_id: Value error, msgpack bin, expected str"),
        # bytes packed by an old encoder (msgpack-python's use_bin_type=False) arrive as msgpack str
        ({"data": b"\x89PNG\r\n\x1a\n"}, False, "data: Value error, msgpack str, expected bin"),  # not UTF-8
        ({"data": bytes(18)}, False, "data: Value error, msgpack str, expected bin"),  # UTF-8 after all
        ({"data": b"\x89PNG", "frame_id": b"\xff"}, False, "frame_id: msgpack str that is not UTF-8"),
        ({"metadata": {"lot": b"\xff"}}, False, "metadata.lot: msgpack str that is not UTF-8"),
    ],
)
def test_msgpack_types_other_than_the_documented_ones_are_invalid_fields_naming_the_field(
    overrides: dict[object, object], use_bin_type: bool, named: str
) -> None:
    """README's wire table: text is msgpack str, data is bin, metadata has str keys. A key that is not str, or a str
    that is not UTF-8, was dead-lettered not_msgpack, as if the payload were garbage; a bin frame id was accepted."""
    fields = {**msgpack.unpackb(encode_frame(make_frame())), **overrides}
    with pytest.raises(CodecError) as caught:
        decode_frame(msgpack.packb(fields, use_bin_type=use_bin_type))
    assert caught.value.reason is CodecErrorReason.INVALID_FIELDS
    assert named in caught.value.detail


def test_a_frame_refused_for_its_msgpack_types_is_still_named_for_its_error_decision() -> None:
    from pipeline.codec import peek_frame_ref

    fields = {**msgpack.unpackb(encode_frame(make_frame())), "data": b"\x89PNG\r\n\x1a\n"}
    ref = peek_frame_ref(msgpack.packb(fields, use_bin_type=False), "line-1", 0)
    assert ref is not None and ref.frame_id == "f-1"
    binary_id = {**fields, "frame_id": b"f-1"}  # not a str id: no decision names it
    assert peek_frame_ref(msgpack.packb(binary_id, use_bin_type=True), "line-1", 0) is None


def test_naming_a_wire_type_field_costs_memory_in_proportion_to_the_payload() -> None:
    # A payload the strict unpacking refused (an int metadata key) was searched for non-UTF-8 str value by value in
    # Python, building a path for each: a 1 MB array took 138 MB and 3 s, a 16 MiB one (under max_frame_bytes) 2.5 GB
    # and 9 s, in the scorer's loop, per frame.
    import tracemalloc

    values = 1_000_000  # in arrays of 1000: a longer one is not_msgpack (codec.MAX_CONTAINER_ITEMS)
    nested = [[1] * 1000 for _ in range(values // 1000)]
    fields = {**msgpack.unpackb(encode_frame(make_frame())), "raw_shape": nested, "metadata": {7: "x"}}
    payload = msgpack.packb(fields, use_bin_type=True)
    del fields, nested
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as caught:
            decode_frame(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.reason is CodecErrorReason.INVALID_FIELDS
    assert "metadata: Value error, key 7 is msgpack int" in caught.value.detail
    assert peak < 3 * 8 * values, peak  # 8 bytes per value unpacked: a few copies, not 138 bytes per value


def test_a_non_utf8_str_is_named_among_a_payloads_first_values() -> None:
    fields = {**msgpack.unpackb(encode_frame(make_frame())), "metadata": {"lot": b"\xff", 7: "x"}}
    with pytest.raises(CodecError) as caught:
        decode_frame(msgpack.packb(fields, use_bin_type=False))
    assert caught.value.detail.startswith("metadata.lot: msgpack str that is not UTF-8")


def test_a_field_named_under_a_key_that_is_not_utf8_is_named_in_text_redis_can_hold() -> None:
    # the detail named the key as the lenient unpacking kept it (a lone surrogate): the scorer's dead letter and error
    # decision then failed to encode (UnicodeEncodeError) and the worker stopped on the batch, again at each restart
    fields = {**msgpack.unpackb(encode_frame(make_frame())), "data": b"\x89PNG", "metadata": {b"\xffk": b"\xfe"}}
    with pytest.raises(CodecError) as caught:
        decode_frame(msgpack.packb(fields, use_bin_type=False))
    assert caught.value.reason is CodecErrorReason.INVALID_FIELDS
    assert "metadata.\\xffk: msgpack str that is not UTF-8" in caught.value.detail
    caught.value.detail.encode("utf-8")  # strict, as redis-py and msgpack encode it
    msgpack.packb(error_decision(make_frame(), caught.value.reason.value, caught.value.detail).model_dump())
