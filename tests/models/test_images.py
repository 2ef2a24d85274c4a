"""Reading images: every file an integrator's folder may hold, read as RGB or refused with the file's name."""

import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.images import ImageError, decode_image, list_images, read_image, read_mask, to_rgb_uint8


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


def test_a_jpeg_cut_short_after_its_exif_thumbnail_is_still_truncated(tmp_path: Path) -> None:
    # an EXIF thumbnail is a whole JPEG inside the APP1 segment: its end-of-image marker must not pass for the image's
    image = np.full((64, 96, 3), 90, np.uint8)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    thumbnail = b"Exif\x00\x00" + cv2.imencode(".jpg", image[::8, ::8])[1].tobytes()
    with_thumbnail = data[:2] + b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail + data[2:]
    assert decode_image(with_thumbnail).shape == (64, 96, 3)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(with_thumbnail[:-100])


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
