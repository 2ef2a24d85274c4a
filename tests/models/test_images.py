from pathlib import Path

import cv2
import numpy as np
import pytest

from models.images import ImageError, decode_image, read_image, read_mask, to_rgb_uint8


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
