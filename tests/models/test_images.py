"""Reading images: every file an integrator's folder may hold, read as RGB or refused with the file's name."""

import io
import re
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.images import ImageError, decode_image, list_images, read_image, read_mask, to_rgb_uint8
from models.jpeg import MAX_MARKERS


def test_gray_rgba_and_16_bit_become_rgb_uint8(tmp_path: Path) -> None:
    deep = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert image[-1, -1, 0] == round(int(deep[-1, -1]) / 257)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    assert to_rgb_uint8(rgba)[0, 0].tolist() == [200, 0, 0]


def test_colour_files_are_read_as_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert read_image(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]


def test_unreadable_inputs_name_the_source(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="frame-7"):
        decode_image(b"", "frame-7")
    with pytest.raises(ImageError, match="too small"):
        to_rgb_uint8(np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageError, match="unsupported pixel type"):
        to_rgb_uint8(np.zeros((16, 16), np.int32))


def test_a_mask_with_an_exif_orientation_lies_over_its_image_as_stored(tmp_path: Path) -> None:
    # read_image ignores EXIF orientation; read_mask applied it, so a JPEG mask tagged "rotate 90" came out turned
    # against its image (and of another aspect, refused as unusable)
    from PIL import Image

    stored = np.zeros((40, 80), np.uint8)
    stored[5:15, 10:30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    for name, array in (("part.jpg", np.stack([stored] * 3, axis=-1)), ("part_mask.jpg", stored)):
        Image.fromarray(array).save(tmp_path / name, quality=100, exif=exif)
    image, mask = read_image(tmp_path / "part.jpg"), read_mask(tmp_path / "part_mask.jpg")
    assert image.shape[:2] == mask.shape == (40, 80)
    assert mask[5:15, 10:30].all() and mask.sum() == 200


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR announcing ``width`` x ``height`` 8-bit grey, with no pixel data after it."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + len(ihdr).to_bytes(4, "big")
        + b"IHDR"
        + ihdr
        + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    )


def test_float_files_outside_zero_to_one_are_refused_rather_than_clipped_white(tmp_path: Path) -> None:
    # a float TIFF holding 0-255 grey levels was clipped to [0, 1]: every pixel above 1 became white, and the frame
    # was scored as such
    ramp = np.tile(np.linspace(0.0, 255.0, 64, dtype=np.float32), (32, 1))
    cv2.imwrite(str(tmp_path / "levels.tif"), ramp)
    with pytest.raises(ImageError, match=r"levels\.tif: float pixels span \[0, 255\]"):
        read_image(tmp_path / "levels.tif")
    cv2.imwrite(str(tmp_path / "nan.tif"), np.where(ramp > 100, np.nan, ramp / 255.0).astype(np.float32))
    with pytest.raises(ImageError, match=r"nan\.tif: .*not a number"):
        read_image(tmp_path / "nan.tif")
    cv2.imwrite(str(tmp_path / "unit.tif"), ramp / 255.0)
    assert read_image(tmp_path / "unit.tif")[0, -1].tolist() == [255, 255, 255]


def test_a_multi_page_tiff_is_refused_rather_than_read_as_its_first_page(tmp_path: Path) -> None:
    cv2.imwritemulti(str(tmp_path / "stack.tif"), [np.full((16, 24), value, np.uint8) for value in (10, 120, 240)])
    with pytest.raises(ImageError, match=r"stack\.tif: holds 3 images \(pages\)"):
        read_image(tmp_path / "stack.tif")


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    # an 875 KB PNG of 30000 x 30000 grey pixels took 3.6 GB and half a minute to read (stream frames were checked)
    (tmp_path / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    with pytest.raises(ImageError, match=r"bomb\.png: 40000x40000 is 1600000000 pixels, more than"):
        read_image(tmp_path / "bomb.png")
    cv2.imwrite(str(tmp_path / "wide.tif"), np.zeros((20, 30), np.uint8))
    with pytest.raises(ImageError, match=r"wide\.tif: 30x20 is 600 pixels, more than the 500 "):
        read_image(tmp_path / "wide.tif", max_pixels=500)
    assert read_image(tmp_path / "wide.tif", max_pixels=600).shape == (20, 30, 3)


def test_folders_list_images_but_not_hidden_files_directories_or_broken_links(tmp_path: Path) -> None:
    # macOS copies leave an AppleDouble "._name.jpg" beside every image: listed, each was a failed read in fit and a
    # dead-lettered frame from a folder source
    image = np.full((16, 16, 3), 90, np.uint8)
    for name in ("a.png", "B.JPG", "c.TIF", "d.webp", "e.bmp", "pièce_部品.png"):
        cv2.imencode(Path(name).suffix, image)[1].tofile(str(tmp_path / name))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".hidden.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    listed = list_images(tmp_path)
    assert [path.name for path in listed] == [
        "B.JPG",
        "a.png",
        "c.TIF",
        "d.webp",
        "e.bmp",
        "link.png",
        "pièce_部品.png",
    ]
    for path in listed:
        assert read_image(path).tolist() == image.tolist() or path.suffix.lower() in (".jpg", ".webp")


@pytest.mark.parametrize(("colour", "name"), [((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((255, 255, 255), "white")])
def test_a_colour_mask_marks_every_pixel_drawn_in_a_bright_colour(tmp_path: Path, colour: tuple[int, int, int],
                                                                  name: str) -> None:  # fmt: skip
    # masks were read as grey (0.299 R + 0.587 G + 0.114 B): a pure red annotation (76) or blue (29) fell below 128,
    # and the defective image's mask came out empty
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[4:8, 5:15] = colour
    cv2.imwrite(str(tmp_path / f"{name}_mask.png"), rgb[..., ::-1])
    mask = read_mask(tmp_path / f"{name}_mask.png")
    assert mask.shape == (20, 30) and mask[4:8, 5:15].all() and mask.sum() == 40


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("kept", [0.3, 0.9, 0.999])
def test_a_file_cut_short_is_refused_as_truncated_whatever_opencv_decodes(tmp_path: Path, suffix: str,
                                                                           kept: float) -> None:  # fmt: skip
    # OpenCV 4 decodes a JPEG cut short with a warning on stderr and the missing rows grey: that frame was scored
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (5, 5), 0)
    data = cv2.imencode(suffix, image)[1].tobytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ImageError, match=rf"cut\{suffix}: .* truncated"):
        read_image(tmp_path / f"cut{suffix}")
    (tmp_path / f"whole{suffix}").write_bytes(data)
    assert read_image(tmp_path / f"whole{suffix}").shape == (64, 96, 3)


def test_a_16_bit_label_mask_is_an_error_not_an_empty_mask(tmp_path: Path) -> None:
    # scaled to 8 bits before the check, a 16-bit label image's 1, 2, ... (instance labels) became 0: the mask read
    # as empty without an error, and its defective image's pixels counted as defect-free
    labels = np.zeros((20, 30), np.uint16)
    labels[4:8, 5:15] = 1
    labels[10:12, 20:25] = 7
    cv2.imwrite(str(tmp_path / "labels_mask.png"), labels)
    with pytest.raises(ImageError, match=r"labels_mask\.png: the mask's brightest pixel is 7 \(of 65535\)"):
        read_mask(tmp_path / "labels_mask.png")
    cv2.imwrite(str(tmp_path / "full_mask.png"), labels.astype(bool) * np.uint16(65535))
    assert read_mask(tmp_path / "full_mask.png").sum() == 50


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blurred noise, RGB uint8: JPEG data of some size in every scan."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 0)


def _motion_photo_video() -> bytes:
    """The start of an MP4 as a phone appends it to a motion photo's JPEG: bytes holding FF DA (start of scan) and
    no FF D9 (end of image) after it, as random bytes do about half the time."""
    rng = np.random.default_rng(5)
    payload = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes().replace(b"\xff\xd9", b"\xff\x00")
    boxes = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00isommp42\x00\x00\x0f\xb8mdat"
    return boxes + payload[:2000] + b"\xff\xda" + payload[2000:]


@pytest.mark.parametrize("appended", ["motion_photo_video", "zero_padding", "second_jpeg"])
def test_bytes_after_the_end_of_image_are_no_part_of_it(appended: str) -> None:
    # a JPEG with an MP4 after it (a phone's motion photo) was refused as truncated: FF DA in the video after its
    # last FF D9 looked like a scan cut short, though OpenCV and Pillow decode such files whole
    image = _textured(64, 96)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    after = {
        "motion_photo_video": _motion_photo_video(),
        "zero_padding": bytes(4096),
        "second_jpeg": cv2.imencode(".jpg", 255 - image)[1].tobytes(),  # an MPO's second picture
    }[appended]
    assert appended != "motion_photo_video" or after.rfind(b"\xff\xd9") < after.rfind(b"\xff\xda")
    np.testing.assert_array_equal(decode_image(data + after), decode_image(data))


def _segments(data: bytes, code: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the marker segments with ``code`` (FF code, length) in JPEG ``data``; found by searching,
    so only for data whose tables and scans hold no such bytes (asserted by the caller)."""
    return [(m.start(), m.start() + 2 + int.from_bytes(data[m.start() + 2 : m.start() + 4], "big"))
            for m in re.finditer(re.escape(bytes([0xFF, code])), data)]  # fmt: skip


def test_a_jpeg_cut_inside_its_main_scan_after_an_exif_thumbnail_is_truncated() -> None:
    # an EXIF thumbnail is a whole JPEG inside the APP1 segment: its end-of-image marker must not pass for the image's
    image = _textured(64, 96)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    thumbnail = b"Exif\x00\x00" + cv2.imencode(".jpg", image[::8, ::8])[1].tobytes()
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumbnail = data[:2] + app1 + data[2:]
    np.testing.assert_array_equal(decode_image(with_thumbnail), decode_image(data))
    scan_data = _segments(with_thumbnail, 0xDA)[-1][1]  # the main scan's entropy-coded data begins here
    for cut in (scan_data + 1, (scan_data + len(with_thumbnail)) // 2, len(with_thumbnail) - 1):
        with pytest.raises(ImageError, match=r"inside the entropy-coded data of its scan 1 .*: truncated"):
            decode_image(with_thumbnail[:cut])
    with pytest.raises(ImageError, match=r"ends inside its APP1 segment at byte 2 .*: truncated"):
        decode_image(with_thumbnail[: len(app1) // 2])


@pytest.mark.parametrize("writer", ["opencv", "pillow"])
def test_a_progressive_jpeg_is_read_whole_and_refused_cut_in_any_of_its_scans(writer: str) -> None:
    from PIL import Image

    image = _textured(64, 96)
    if writer == "opencv":
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", progressive=True, quality=90)
        data = buffer.getvalue()
    scans = _segments(data, 0xDA)
    assert len(scans) == 10 and data.count(b"\xff\xd9") == 1  # libjpeg's progressive script; no stray markers
    assert decode_image(data).shape == (64, 96, 3)
    for number, (_, scan_data) in enumerate(scans, start=1):
        with pytest.raises(ImageError, match=rf"scan {number} \(SOS at byte \d+\), without its end-of-image marker"):
            decode_image(data[: scan_data + 1])


@pytest.mark.parametrize("writer", ["opencv", "pillow"])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_restart_interval_jpeg_is_read_whole_and_refused_wherever_it_is_cut(writer: str, progressive: bool,
                                                                              seed: int) -> None:  # fmt: skip
    from PIL import Image

    rng = np.random.default_rng(seed)
    interval = int(rng.integers(1, 4))  # in MCUs: restart markers every 1-3 blocks of 16 x 16 pixels
    image = _textured(96, 160, seed)
    if writer == "opencv":
        flags = [cv2.IMWRITE_JPEG_RST_INTERVAL, interval, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
        data = cv2.imencode(".jpg", image, flags)[1].tobytes()
    else:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", restart_marker_blocks=interval, progressive=progressive)
        data = buffer.getvalue()
    assert len(re.findall(rb"\xff[\xd0-\xd7]", data)) > 8  # restart markers past a whole cycle
    assert decode_image(data).shape == (96, 160, 3)
    for cut in rng.choice(len(data), 80, replace=False):
        with pytest.raises(ImageError, match="truncated"):
            decode_image(data[:cut])


@pytest.mark.parametrize("intervals_lost", [1, 3, 7])
def test_a_jpeg_losing_restart_intervals_inside_is_refused_though_its_end_marker_survives(intervals_lost: int) -> None:
    # data missing from the middle, the end intact: OpenCV decoded it with a "Corrupt JPEG data" warning, the
    # intervals after the gap shifted, and the frame was scored. Restart markers must run RST0, RST1, ... RST7,
    # RST0, ...: a gap of any number of intervals but a multiple of 8 breaks the cycle
    data = cv2.imencode(".jpg", _textured(64, 96), [cv2.IMWRITE_JPEG_RST_INTERVAL, 1])[1].tobytes()
    restarts = [m.start() for m in re.finditer(rb"\xff[\xd0-\xd7]", data)]
    damaged = data[: restarts[2]] + data[restarts[2 + intervals_lost] :]
    assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is not None
    due, found = 2, (2 + intervals_lost) % 8
    with pytest.raises(ImageError, match=rf"damaged inside its scan 1: restart marker RST{found} .* RST{due} is due"):
        decode_image(damaged)


def _broken_jpegs() -> dict[str, bytes]:
    whole = cv2.imencode(".jpg", _textured(64, 96))[1].tobytes()
    scan = _segments(whole, 0xDA)[0][0]
    other = cv2.imencode(".jpg", _textured(64, 96, 1))[1].tobytes()
    return {
        "a second start-of-image marker": whole[: len(whole) // 2] + other,
        "a scan \\(SOS at byte 2\\) before any frame header": whole[:2] + whole[scan:],
        "before any frame header \\(SOF\\): it holds no image": b"\xff\xd8\xff\xfe\x00\x04hi\xff\xd9",
        f"more than {MAX_MARKERS} markers": whole[:scan] + b"\xff\xd0" * MAX_MARKERS + whole[scan:],
    }


@pytest.mark.parametrize("why", list(_broken_jpegs()))
def test_a_jpeg_of_broken_structure_is_refused_saying_what_is_wrong(why: str) -> None:
    # a JPEG cut short with a whole one after it (two frames joined by a transport) decoded as the first picture
    # with grey where its data ended, and was scored
    with pytest.raises(ImageError, match=f"frame-3: JPEG .*{why}"):
        decode_image(_broken_jpegs()[why], "frame-3")


def test_stray_and_fill_bytes_are_passed_over_as_libjpeg_passes_over_them() -> None:
    # libjpeg decodes such files whole (fill bytes FF may precede any marker; stray bytes draw a warning
    # "extraneous bytes before marker"): refusing them would refuse a picture OpenCV and Pillow show whole
    data = cv2.imencode(".jpg", _textured(64, 96), [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes()
    scan, first_restart = _segments(data, 0xDA)[0][0], data.index(b"\xff\xd0")
    stray = b"\x00\x00\xff\x00" + b"\xff\xfe\x00\x01"  # two stray bytes, FF 00, a comment of length 1
    quirky = (data[:scan] + stray + b"\xff\xff" + data[scan:first_restart] + b"\xff\xff"  # fill before SOS, RST0
              + data[first_restart:-2] + b"\xff\xff\xff" + data[-2:])  # fmt: skip  # and before the end of image
    np.testing.assert_array_equal(decode_image(quirky), decode_image(data))
