"""Seeded fuzzing of what a scoring worker does with a frames-stream payload (``workers.score.ScoreWorker.prepare``
and ``score``): ``decode_frame`` with ``streams.max_frame_bytes``, then ``decode_pixels`` with
``streams.max_frame_pixels``; on a CodecError, ``peek_frame_ref`` and the error decision it names.

Every input must end in a decoded image or a CodecError carrying a dead-letter reason whose detail UTF-8 can hold,
never another exception, and within a memory bound (tracemalloc: Python objects, numpy buffers, msgpack's lists).
Pure unit tests: no Redis. The inputs are derived from ``random.Random(seed)``, so a failure is reproducible."""

from __future__ import annotations

import math
import random
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest

from pipeline.codec import (
    CodecError,
    CodecErrorReason,
    decode_frame,
    decode_pixels,
    encode_decision,
    encode_frame,
    encode_pixels,
    peek_frame_ref,
)
from pipeline.config import StreamSettings
from pipeline.messages import MAX_METADATA_ENTRIES, Frame, error_decision

LINE = "line-1"
SETTINGS = StreamSettings()  # the worker's defaults: 16 MiB payloads, 50 MP frames
REASONS = set(CodecErrorReason)
# What one input may allocate at its peak (tracemalloc): what msgpack makes of the payload (Python objects take up to
# ~30 bytes per payload byte: a map of 200,000 short keys in 2 MB is a 25 MB dict) and a fixed allowance.
PEAK_BYTES_PER_PAYLOAD_BYTE = 40
PEAK_BYTES_ALLOWED = 16 * 1024 * 1024


def through_the_scorer(payload: bytes) -> str:
    """What a scoring worker makes of ``payload``: ``"scored"`` (pixels ready for the model) or the dead-letter
    reason. Fails the test on any exception other than CodecError, or on an error decision that cannot be encoded."""
    frame: Frame | None = None
    try:
        frame = decode_frame(payload, SETTINGS.max_frame_bytes)
        image = decode_pixels(frame, SETTINGS.max_frame_pixels)
    except CodecError as error:
        assert error.reason in REASONS
        error.detail.encode("utf-8")  # strict, as redis-py encodes the dead letter's detail
        named = frame or peek_frame_ref(payload, LINE, received_at_ns=0)
        if named is not None:
            encode_decision(error_decision(named, error.reason.value, error.detail))
        return error.reason.value
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype in (np.uint8, np.uint16)
    return "scored"


def outcomes(payloads: Iterator[bytes]) -> dict[str, int]:
    """Outcome counts of ``payloads`` through the scorer, each input's allocations bounded."""
    counts: dict[str, int] = {}
    for payload in payloads:
        tracemalloc.start()
        try:
            outcome = through_the_scorer(payload)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < PEAK_BYTES_PER_PAYLOAD_BYTE * len(payload) + PEAK_BYTES_ALLOWED, (peak, payload[:64])
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def valid_fields(encoding: str) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    image = cv2.GaussianBlur(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), (3, 3), 0)
    data, extra = encode_pixels(image, encoding)  # type: ignore[arg-type]
    frame = Frame(line_id=LINE, camera_id="cam0", frame_id="f-1", sequence=3, captured_at_ns=10**18,
                  encoding=encoding, data=data, metadata={"part": "A-17", "n": 2, "ok": True}, **extra)  # type: ignore[arg-type]  # fmt: skip
    fields: dict[str, Any] = msgpack.unpackb(encode_frame(frame))
    return fields


ENCODINGS = ("raw", "png", "jpeg")


def valid_payload(encoding: str) -> bytes:
    return msgpack.packb(valid_fields(encoding), use_bin_type=True)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_valid_payloads_the_fuzzing_starts_from_are_scored(encoding: str) -> None:
    assert outcomes(iter([valid_payload(encoding)])) == {"scored": 1}


def test_random_bytes() -> None:
    rng = random.Random(1)
    payloads = (rng.randbytes(rng.choice([0, 1, 2, 5, 17, 64, 300, 4000])) for _ in range(400))
    counts = outcomes(payloads)
    assert "scored" not in counts and sum(counts.values()) == 400


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_valid_payload_cut_at_every_length(encoding: str) -> None:
    payload = valid_payload(encoding)
    counts = outcomes(payload[:length] for length in range(len(payload)))
    assert counts == {CodecErrorReason.NOT_MSGPACK.value: len(payload)}  # a map cut short is no msgpack


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_bit_flips(encoding: str) -> None:
    rng = random.Random(f"flips-{encoding}")
    payload = valid_payload(encoding)

    def flipped() -> Iterator[bytes]:
        for _ in range(300):
            mutable = bytearray(payload)
            for _ in range(rng.choice([1, 1, 2, 3, 8])):
                mutable[rng.randrange(len(mutable))] ^= 1 << rng.randrange(8)
            yield bytes(mutable)

    counts = outcomes(flipped())
    assert len(counts) > 2, counts  # flips land in the map's structure, its fields and its pixels


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_image_data_cut_at_every_length_or_corrupted(encoding: str) -> None:
    fields = valid_fields(encoding)
    data = fields["data"]
    rng = random.Random(f"image-{encoding}")

    def corrupted() -> Iterator[bytes]:
        for length in range(len(data)):
            yield msgpack.packb({**fields, "data": data[:length]})
        for _ in range(200):
            mutable = bytearray(data)
            start = rng.randrange(len(mutable))
            mutable[start : start + rng.choice([1, 4, 32])] = rng.randbytes(rng.choice([1, 4, 32]))
            yield msgpack.packb({**fields, "data": bytes(mutable)})

    counts = outcomes(corrupted())
    assert counts.get(CodecErrorReason.UNDECODABLE_IMAGE.value, 0) >= len(data)  # every cut is refused


WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, math.nan, math.inf, "", "x", "é" * 3, "\x00", b"", b"\xff\xfe",
    [], [1, 2, 3], [[[]]], {}, {"a": 1}, {"a": {"b": [None]}}, {1: 2}, msgpack.ExtType(5, b"x"),
    msgpack.Timestamp(1, 2), [None] * 5000, "y" * 100_000, b"z" * 100_000, {f"k{index}": None for index in range(5000)},
]  # fmt: skip


def with_each_field_replaced(encoding: str) -> Iterator[bytes]:
    fields = valid_fields(encoding)
    for name in [*fields, "unknown_field"]:
        for value in WRONG_VALUES:
            for use_bin_type in (True, False):
                yield msgpack.packb({**fields, name: value}, use_bin_type=use_bin_type)
        yield msgpack.packb({key: item for key, item in fields.items() if key != name})  # missing


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_msgpack_of_the_wrong_type_at_every_field(encoding: str) -> None:
    counts = outcomes(with_each_field_replaced(encoding))
    assert counts.get(CodecErrorReason.INVALID_FIELDS.value, 0) > 200, counts


def nested(depth: int, leaf: bytes, header: bytes) -> bytes:
    return header * depth + leaf


def map_with(fields: dict[str, Any], name: str | bytes, raw_value: bytes) -> bytes:
    """The msgpack map ``fields`` with ``name``'s value replaced by ``raw_value`` (msgpack bytes, maybe not valid);
    a ``name`` given as bytes is the key's msgpack itself."""
    rest = {key: item for key, item in fields.items() if key != name}
    head = msgpack.packb(rest)
    assert head[0] & 0xF0 == 0x80  # a fixmap: one more key fits in its header
    key = name if isinstance(name, bytes) else msgpack.packb(name)
    return bytes([head[0] + 1]) + head[1:] + key + raw_value


HUGE_HEADERS = [
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array 32 of 4 G items
    b"\xdf\xff\xff\xff\xff",  # map 32 of 4 G pairs
    b"\xc9\xff\xff\xff\xff\x05",  # ext 32 of 4 GiB
    b"\xdd\x00\x01\x00\x00",  # array of 65536 items, none there
]


def test_huge_declared_lengths_and_deep_nesting() -> None:
    fields = valid_fields("raw")

    def payloads() -> Iterator[bytes]:
        for header in HUGE_HEADERS:
            yield header
            yield header + bytes(64)
            for name in fields:
                yield map_with(fields, name, header)
                yield map_with(fields, name, header + bytes(1000))
        for depth in (10, 500, 999, 1000, 1023, 1024, 1025, 5000):
            for header, leaf in ((b"\x91", b"\xc0"), (b"\x81\xa1k", b"\xc0"), (b"\xdd\x00\x00\x40\x00", b"")):
                yield nested(depth, leaf, header)
                for name in ("version", "frame_id", "raw_shape", "metadata", "data", "unknown"):
                    yield map_with(fields, name, nested(depth, leaf, header))

    counts = outcomes(payloads())
    assert "scored" not in counts, counts


def test_containers_far_larger_than_a_frame_holds() -> None:
    fields = valid_fields("raw")

    def payloads() -> Iterator[bytes]:  # as many items as a 1-2 MB payload holds, where a frame has a handful
        yield msgpack.packb({**fields, "raw_shape": [""] * 1_000_000})
        yield msgpack.packb({**fields, "raw_shape": [1] * 1_000_000})
        yield msgpack.packb({**fields, **{f"{index:x}": None for index in range(200_000)}})
        int_keys: dict[Any, Any] = {index: None for index in range(200_000)}
        yield msgpack.packb({**fields, **int_keys})
        yield msgpack.packb({**fields, "version": [None] * 1_000_000})
        yield msgpack.packb({**fields, "metadata": {f"{index:x}": index for index in range(200_000)}})
        yield msgpack.packb({**fields, "metadata": {f"{index:x}": [index] for index in range(200_000)}})
        yield msgpack.packb({**fields, "metadata": {b"\xff" * 1_000_000: 1}}, use_bin_type=False)
        yield msgpack.packb({**fields, "metadata": {str(index): index for index in range(MAX_METADATA_ENTRIES + 1)}})

    counts = outcomes(payloads())
    assert set(counts) == {CodecErrorReason.NOT_MSGPACK.value, CodecErrorReason.INVALID_FIELDS.value}, counts


def test_non_utf8_text_at_every_text_field_and_metadata() -> None:
    fields = valid_fields("png")
    rng = random.Random(7)
    bad_texts = [b"\xff", b"\xc3", b"a\xed\xa0\x80b", b"\xf4\x90\x80\x80", b"\xc0\xaf", rng.randbytes(50)]

    def payloads() -> Iterator[bytes]:
        for bad in bad_texts:
            for name in ("line_id", "camera_id", "frame_id", "encoding", "raw_dtype", "version"):
                yield map_with(fields, name, b"\xd9" + bytes([len(bad)]) + bad)
            yield map_with(fields, "metadata", b"\x81\xd9" + bytes([len(bad)]) + bad + b"\x01")  # key
            yield map_with(fields, "metadata", b"\x81\xa1k\xd9" + bytes([len(bad)]) + bad)  # value
            yield map_with(fields, b"\xd9" + bytes([len(bad)]) + bad, b"\xc0")  # a key of the frame

    counts = outcomes(payloads())
    assert counts.get(CodecErrorReason.INVALID_FIELDS.value, 0) >= 6 * len(bad_texts), counts


@pytest.mark.parametrize("version", [0, 2, -1, 2**63, 2**64 - 1, "1", 1.0, True, None, b"\x01", [1], {"v": 1}])
def test_valid_msgpack_with_an_unknown_version(version: object) -> None:
    payload = msgpack.packb({**valid_fields("png"), "version": version})
    assert outcomes(iter([payload])) == {CodecErrorReason.UNKNOWN_VERSION.value: 1}


RAW_SHAPES: list[Any] = [
    [], [8], [8, 8, 3, 1], [0, 8], [8, 0], [-8, 8], [8, 8, 0], [8, 8, 2], [8, 8, 5], [2**62, 2**62], [2**32, 2**32, 3],
    [2**63 - 1, 1], [7, 8], [8, 7, 3], [1, 64], [16, 24, 3], [24, 16, 3], [16, 24], [16, 24, 1], [16, 24, 4],
]  # fmt: skip
RAW_DTYPES: list[Any] = ["uint8", "uint16", "float32", "uint32", "<u2", "int8", "", "UINT8", None]


def test_raw_pixels_of_every_shape_dtype_and_length() -> None:
    fields = valid_fields("raw")
    data = fields["data"]
    lengths = [0, 1, len(data) - 1, len(data), len(data) + 1, 2 * len(data), 4 * len(data) // 3, 8 * 8]

    def payloads() -> Iterator[bytes]:
        for shape in RAW_SHAPES:
            for dtype in RAW_DTYPES:
                for length in lengths:
                    yield msgpack.packb({**fields, "raw_shape": shape, "raw_dtype": dtype, "data": bytes(length)})

    counts = outcomes(payloads())
    assert counts["scored"] >= 5, counts  # (16, 24, 3) and its grey, one-channel and RGBA forms, 16-bit
    assert counts[CodecErrorReason.RAW_SHAPE_MISMATCH.value] > 100, counts


def spliced(rng: random.Random, pieces: list[bytes]) -> bytes:
    """Bytes cut from ``pieces`` and joined: msgpack fragments in orders no producer writes."""
    out = bytearray()
    for _ in range(rng.randrange(1, 6)):
        piece = rng.choice(pieces)
        start = rng.randrange(len(piece))
        out += piece[start : start + rng.randrange(1, 64)]
    return bytes(out)


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    lambda rng, payload: payload[: rng.randrange(len(payload))] + rng.randbytes(rng.randrange(1, 9)),
    lambda rng, payload: payload[:5] + rng.choice(HUGE_HEADERS) + payload[5:],
    lambda rng, payload: payload.replace(b"\xa3cam", b"\xdb\xff\xff\xff\xff", 1),
    lambda rng, payload: struct.pack(">B", 0x80 | rng.randrange(16)) + payload[1:],  # another key count
    lambda rng, payload: spliced(rng, [payload, *HUGE_HEADERS, msgpack.packb(WRONG_VALUES[:24])]),
]


def test_random_mutations_of_valid_payloads() -> None:
    rng = random.Random(11)
    bases = [valid_payload(encoding) for encoding in ENCODINGS]
    counts = outcomes(rng.choice(MUTATORS)(rng, rng.choice(bases)) for _ in range(1500))
    assert sum(counts.values()) == 1500
