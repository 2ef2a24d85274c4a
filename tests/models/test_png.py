"""PNG structure walked chunk by chunk to IEND (models/png.py): whole PNGs of every depth and layout pass, data cut
anywhere is truncated whatever bytes remain, bytes after IEND are no part of the image, damaged critical chunks are
refused, and files and frames are refused through models.images and the codec alike."""

from __future__ import annotations

import io
import re
import struct
import zlib

import cv2
import numpy as np
import pytest

from models.images import ImageError, decode_image
from models.png import MAX_CHUNKS, PNG_SIGNATURE, walk_png
from pipeline.codec import CodecError, CodecErrorReason, decode_pixels
from pipeline.messages import Frame


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk: length, type, data, CRC (the right one unless ``crc`` is given)."""
    checksum = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", checksum)


def chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """``(position, type, length)`` of each chunk of whole PNG ``data``, walked by hand."""
    found, position = [], len(PNG_SIGNATURE)
    while position < len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        found.append((position, kind, length))
        position += 12 + length
    return found


def textured(height: int, width: int, channels: int, dtype: type[np.integer], seed: int = 0) -> np.ndarray:
    """Blurred noise of ``dtype``'s whole range: PNG data of some kilobytes, in several IDAT chunks when larger."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, np.iinfo(dtype).max, (height, width, channels), dtype=dtype, endpoint=True)
    blurred = cv2.GaussianBlur(noise, (5, 5), 0)
    return blurred if channels > 1 else blurred.reshape(height, width)


def encoded(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_whole_pngs_of_every_depth_and_channel_count_pass_with_their_size(channels: int,
                                                                          dtype: type[np.integer]) -> None:  # fmt: skip
    image = textured(90, 140, channels, dtype)
    data = encoded(image)
    assert walk_png(data) == ((140, 90), None)
    decoded = decode_image(data, keep_depth=True)
    assert decoded.shape == (90, 140, 3) and decoded.dtype == dtype


@pytest.mark.parametrize("mode", ["P", "LA", "1", "I;16"])
def test_whole_pngs_pillow_writes_pass_with_their_ancillary_chunks(mode: str) -> None:
    from PIL import Image, PngImagePlugin

    picture = Image.fromarray(textured(40, 60, 3, np.uint8)).convert(mode)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "lot 4711")  # a tEXt chunk
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", pnginfo=info, dpi=(300, 300))  # and pHYs
    data = buffer.getvalue()
    assert {b"tEXt", b"pHYs"} <= {kind for _, kind, _ in chunks(data)}
    assert walk_png(data) == ((60, 40), None)
    assert decode_image(data).shape == (40, 60, 3)


def test_a_png_cut_at_any_byte_is_truncated() -> None:
    data = encoded(textured(64, 96, 3, np.uint8))
    assert len([kind for _, kind, _ in chunks(data) if kind == b"IDAT"]) >= 2
    for cut in range(len(PNG_SIGNATURE), len(data)):
        layout = walk_png(data[:cut])
        assert layout.problem is not None and layout.problem.endswith(
            "truncated (a file still being written, or a copy or transfer cut short)"
        ), cut
        assert layout.size == ((96, 64) if cut >= 24 else None), cut  # the size is read once IHDR holds it
    for cut in (10, 30, len(data) // 2, len(data) - 5):
        with pytest.raises(ImageError, match=r"frame-9: PNG data ends .*: truncated"):
            decode_image(data[:cut], name="frame-9")


def test_a_png_cut_whose_remaining_bytes_hold_iend_is_truncated() -> None:
    # the check searched the data for the bytes "IEND" anywhere: a text chunk (or compressed pixels) holding them let
    # a PNG cut inside its pixel data pass, to be refused by OpenCV without a reason (or decoded with rows missing)
    data = encoded(textured(64, 96, 3, np.uint8))
    ihdr_end = chunks(data)[1][0]
    with_text = data[:ihdr_end] + chunk(b"tEXt", b"Comment\x00IEND of lot 4711") + data[ihdr_end:]
    assert decode_image(with_text).shape == (64, 96, 3)
    idat_position, _, idat_length = next(entry for entry in chunks(with_text) if entry[1] == b"IDAT")
    for cut in (idat_position + 4, idat_position + 8 + idat_length // 2, len(with_text) - 13):
        assert b"IEND" in with_text[:cut]
        with pytest.raises(ImageError, match=r"PNG data ends inside (the length and type of )?its (IDAT )?chunk"):
            decode_image(with_text[:cut])


def test_a_png_ending_after_a_whole_chunk_without_iend_is_truncated() -> None:
    data = encoded(textured(64, 96, 1, np.uint8))
    *before, (iend, _, _) = chunks(data)
    ends = rf"PNG data ends after {len(before)} chunk\(s\) at byte {iend}, without its IEND chunk: truncated"
    with pytest.raises(ImageError, match=ends):
        decode_image(data[:iend])


@pytest.mark.parametrize("trailer", ["zero_padding", "sdk_trailer", "second_png", "chunk_like_garbage"])
def test_bytes_after_iend_are_no_part_of_the_image(trailer: str) -> None:
    image = textured(64, 96, 3, np.uint8)
    data = encoded(image)
    after = {
        "zero_padding": bytes(4096),
        "sdk_trailer": b"CAMSDK\x01\x02" + np.random.default_rng(1).bytes(500),
        "second_png": encoded(255 - image),
        "chunk_like_garbage": b"\x00\x00\x00\x10\xff\xfe\xfd\xfc",  # no chunk: would be malformed inside the image
    }[trailer]
    assert walk_png(data + after) == ((96, 64), None)
    np.testing.assert_array_equal(decode_image(data + after), decode_image(data))


def test_a_critical_chunk_with_a_wrong_crc_is_damaged_an_ancillary_one_is_passed_over() -> None:
    image = textured(64, 96, 3, np.uint8)
    data = encoded(image)
    position, _, length = next(entry for entry in chunks(data) if entry[1] == b"IDAT")
    flipped = bytearray(data)
    flipped[position + 8 + length // 2] ^= 0x10  # one bit of compressed pixels changed in transfer
    with pytest.raises(ImageError, match=rf"PNG is damaged: its IDAT chunk at byte {position} does not match its CRC"):
        decode_image(bytes(flipped))
    # libpng decodes a PNG whose text chunk's CRC is wrong whole (with a warning): so is it here
    ihdr_end = chunks(data)[1][0]
    with_bad_text = data[:ihdr_end] + chunk(b"tEXt", b"Comment\x00hello", crc=1) + data[ihdr_end:]
    assert walk_png(with_bad_text).problem is None
    np.testing.assert_array_equal(decode_image(with_bad_text), decode_image(data))


def test_malformed_pngs_are_refused_naming_what_breaks() -> None:
    data = encoded(textured(32, 32, 1, np.uint8))
    second = chunks(data)[1][0]
    not_letters = data[:second] + b"\x00\x00\x00\x00\x01\x02\x03\x04\x00\x00\x00\x00" + data[second:]
    assert "has type b'\\x01\\x02\\x03\\x04', not letters" in (walk_png(not_letters).problem or "")
    no_ihdr = PNG_SIGNATURE + data[second:]
    with pytest.raises(ImageError, match=r"PNG without the IHDR chunk that must follow its signature \(found IDAT\)"):
        decode_image(no_ihdr)
    ihdr_end = second
    no_pixels = data[:ihdr_end] + chunk(b"IEND", b"")
    assert walk_png(no_pixels).problem == f"PNG ends (IEND at byte {ihdr_end}) before any IDAT chunk: it holds no image"
    huge_length = data[:second] + struct.pack(">I", 2**31) + data[second + 4 :]
    assert "announces 2147483648 bytes" in (walk_png(huge_length).problem or "")


def test_a_png_of_more_chunks_than_any_image_holds_is_refused_after_max_chunks() -> None:
    data = encoded(textured(16, 16, 1, np.uint8))
    second = chunks(data)[1][0]
    flood = data[:second] + chunk(b"tEXt", b"") * MAX_CHUNKS + data[second:]
    assert walk_png(flood).problem == f"PNG is malformed: more than {MAX_CHUNKS} chunks " \
                                      "(a PNG holds one per 8-64 KiB of data)"  # fmt: skip
    assert walk_png(data[:second] + chunk(b"tEXt", b"") * (MAX_CHUNKS - 4) + data[second:]).problem is None


def test_a_cut_png_frame_is_dead_lettered_undecodable_naming_the_truncation() -> None:
    data = encoded(textured(64, 96, 3, np.uint8))
    idat_position = next(position for position, kind, _ in chunks(data) if kind == b"IDAT")
    cut = data[: idat_position + 100] + b"IEND"  # the old check's "IEND anywhere" satisfied
    frame = Frame(line_id="line-1", camera_id="cam", frame_id="f-1", sequence=0, captured_at_ns=0, encoding="png",
                  data=cut)  # fmt: skip
    with pytest.raises(CodecError) as caught:
        decode_pixels(frame, max_pixels=10**6)
    assert caught.value.reason is CodecErrorReason.UNDECODABLE_IMAGE
    assert re.search(r"frame f-1: PNG data ends inside its IDAT chunk at byte \d+ .*: truncated", caught.value.detail)
