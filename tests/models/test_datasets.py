"""Dataset layouts: masks found (or not) for each test image, malformed split files, calibration images."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models import datasets  # a module import: pytest would collect `test_items` / `TestItem` as tests


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)
    return path


def _image(path: Path, shape: tuple[int, int] = (32, 32), value: int = 100) -> Path:
    return _write(path, np.full(shape, value, np.uint8))


def _mask(path: Path, shape: tuple[int, int] = (32, 32)) -> Path:
    mask = np.zeros(shape, np.uint8)
    mask[4:12, 4:12] = 255
    return _write(path, mask)


def _split_root(root: Path, split: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "split.json").write_text(json.dumps(split))
    return root


def _mvtec(root: Path, with_test_good: bool = True) -> Path:
    for number in range(3):
        _image(root / "train" / "good" / f"train_{number}.png")
    if with_test_good:
        for number in range(2):
            _image(root / "test" / "good" / f"good_{number}.png")
    for number in range(2):
        _image(root / "test" / "crack" / f"crack_{number}.png", value=200)
    _mask(root / "ground_truth" / "crack" / "crack_0_mask.png")  # crack_1 has no mask
    return root


def test_split_jpeg_images_keep_their_same_stem_png_masks(tmp_path: Path) -> None:
    """MTD's layout: X.jpg with its mask X.png beside it."""
    _image(tmp_path / "Free" / "a.jpg")
    _image(tmp_path / "Crack" / "b.jpg")
    mask = _mask(tmp_path / "Crack" / "b.png")
    _image(tmp_path / "Crack" / "c.jpg")  # no c.png
    root = _split_root(tmp_path, {"train": [], "test_good": ["Free/a.jpg"],
                                  "test_defective": ["Crack/b.jpg", "Crack/c.jpg"]})  # fmt: skip
    items = datasets.test_items(root)
    assert [(item.label, item.defect_type, item.mask) for item in items] == [
        (0, "good", None), (1, "Crack", mask), (1, "Crack", None)]  # fmt: skip
    assert [item.has_mask for item in items] == [True, True, False]


def test_split_png_images_are_never_their_own_masks(tmp_path: Path) -> None:
    _image(tmp_path / "Crack" / "b.png")
    _image(tmp_path / "Crack" / "c.png")
    mask = _mask(tmp_path / "masks" / "b_label.png")
    root = _split_root(tmp_path, {"train": [], "test_good": [], "test_defective": ["Crack/b.png", "Crack/c.png"],
                                  "masks": {"Crack/b.png": "masks/b_label.png"}})  # fmt: skip
    assert [item.mask for item in datasets.test_items(root)] == [mask, None]


def test_split_mask_mapping_to_a_missing_file_means_no_mask(tmp_path: Path) -> None:
    _image(tmp_path / "Crack" / "b.jpg")
    _mask(tmp_path / "Crack" / "b.png")  # the mapping wins over the same-stem file
    root = _split_root(tmp_path, {"train": [], "test_good": [], "test_defective": ["Crack/b.jpg"],
                                  "masks": {"Crack/b.jpg": "masks/absent.png"}})  # fmt: skip
    assert datasets.test_items(root)[0].mask is None


@pytest.mark.parametrize(
    ("masks", "complaint"),
    [
        ([["Crack/b.png", "m.png"]], "'masks' must map"),
        ({"Crack/other.png": "m.png"}, "not in 'test_defective'"),
        ({"Crack/b.png": 3}, "maps to 3"),
        ({"Crack/b.png": "Crack/b.png"}, "maps to itself"),
    ],
)
def test_malformed_mask_mappings_are_errors_naming_the_file(tmp_path: Path, masks: object, complaint: str) -> None:
    root = _split_root(tmp_path, {"train": [], "test_good": [], "test_defective": ["Crack/b.png"], "masks": masks})
    with pytest.raises(datasets.DatasetError, match=complaint) as error:
        datasets.test_items(root)
    assert str(root / "split.json") in str(error.value)


def test_mvtec_defective_image_without_mask_has_none(tmp_path: Path) -> None:
    root = _mvtec(tmp_path)
    by_name = {item.image.name: item for item in datasets.test_items(root)}
    assert by_name["crack_0.png"].mask == root / "ground_truth" / "crack" / "crack_0_mask.png"
    assert by_name["crack_0.png"].has_mask and by_name["good_0.png"].has_mask
    assert by_name["crack_1.png"].mask is None and not by_name["crack_1.png"].has_mask


VALID = {"train": ["a.png"], "test_good": ["b.png"], "test_defective": ["c.png"]}


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (json.dumps(VALID | {"train": None}), "'train' must be a list of image paths"),
        (json.dumps(VALID | {"train": [1, 2]}), "'train' must be a list of image paths .*; entry 0 is 1"),
        (json.dumps(VALID | {"train": "abc"}), "'train' must be a list of image paths .*, got str"),
        (json.dumps(VALID | {"test_good": ["ok.png", ""]}), "'test_good' must be a list of image paths .*; entry 1"),
        (json.dumps([VALID]), "expected a JSON object"),
        (json.dumps({"train": []}), r"missing keys \['test_good', 'test_defective'\]"),
        ("{not json", "not valid JSON"),
        (b'{"train": ["\xff\xfe.png"]}', "not UTF-8"),
    ],
)
def test_malformed_split_files_are_errors_naming_the_file(tmp_path: Path, content: str | bytes,
                                                          complaint: str) -> None:  # fmt: skip
    split_file = tmp_path / "split.json"
    if isinstance(content, bytes):
        split_file.write_bytes(content)
    else:
        split_file.write_text(content)
    for read in (datasets.good_images, datasets.test_items, datasets.calibration_images):
        with pytest.raises(datasets.DatasetError, match=complaint) as error:
            read(tmp_path)
        assert str(split_file) in str(error.value)


def test_calibration_images_of_an_mvtec_root_are_its_held_out_good_images(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "data")
    images, description = datasets.calibration_images(root)
    assert images == [root / "test" / "good" / "good_0.png", root / "test" / "good" / "good_1.png"]
    assert not set(images) & set(datasets.good_images(root))
    assert description == f"held-out good images of {root} (test/good)"
    folder_images, folder_description = datasets.calibration_images(root / "train" / "good")  # a plain folder
    assert folder_images == datasets.good_images(root) and str(root / "train" / "good") in folder_description


def test_calibration_images_of_a_split_root_are_its_test_good_list(tmp_path: Path) -> None:
    for name in ("Free/t.jpg", "Free/g1.jpg", "Free/g2.jpg"):
        _image(tmp_path / name)
    root = _split_root(tmp_path, {"train": ["Free/t.jpg"], "test_good": ["Free/g1.jpg", "Free/g2.jpg"],
                                  "test_defective": ["Crack/d.jpg"]})  # fmt: skip
    images, description = datasets.calibration_images(root)
    assert images == [root / "Free" / "g1.jpg", root / "Free" / "g2.jpg"]
    assert "held-out good images" in description and "test_good" in description


def test_calibration_images_refuse_a_dataset_root_without_held_out_good_images(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetError, match="no held-out good images"):
        datasets.calibration_images(_mvtec(tmp_path / "mvtec", with_test_good=False))
    split_root = _split_root(tmp_path / "split", {"train": ["t.jpg"], "test_good": [], "test_defective": []})
    with pytest.raises(datasets.DatasetError, match="'test_good' is empty"):
        datasets.calibration_images(split_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetError, match="no images found"):
        datasets.calibration_images(tmp_path / "empty")


@pytest.mark.parametrize(
    ("mask_shape", "image_shape"),
    [((400, 300), (400, 300)), ((200, 150), (400, 300)), ((111, 52), (222, 103)), ((800, 600), (400, 300))],
)
def test_a_mask_at_another_resolution_with_the_same_aspect_is_accepted(
    mask_shape: tuple[int, int], image_shape: tuple[int, int]
) -> None:
    assert datasets.mask_shape_problem(Path("m.png"), mask_shape, Path("i.jpg"), image_shape) is None


@pytest.mark.parametrize(("mask_shape", "image_shape"), [((300, 400), (400, 300)), ((400, 300), (400, 320))])
def test_a_mask_of_another_aspect_ratio_is_an_error_naming_both_files(
    mask_shape: tuple[int, int], image_shape: tuple[int, int]
) -> None:
    problem = datasets.mask_shape_problem(Path("m.png"), mask_shape, Path("i.jpg"), image_shape)
    assert re.search(r"mask m\.png is .* but its image i\.jpg is .*aspect ratio", problem or "")


def test_split_paths_may_be_absolute(tmp_path: Path) -> None:
    """Images kept elsewhere (a shared archive) are listed by absolute path, as before masks were checked."""
    root, archive = tmp_path / "line", tmp_path / "archive"
    root.mkdir()
    _image(archive / "a.png")
    split = {"train": [str(archive / "a.png")], "test_good": ["b.png"], "test_defective": []}
    (root / "split.json").write_text(json.dumps(split))
    assert datasets.good_images(root) == [archive / "a.png"]


def test_image_shape_reads_the_header_as_read_image_would_decode_it(tmp_path: Path) -> None:
    from models.images import read_image

    files = [
        _write(tmp_path / "grey.png", np.zeros((37, 53), np.uint8)),
        _write(tmp_path / "colour.jpg", np.zeros((41, 29, 3), np.uint8)),
        _write(tmp_path / "deep.tif", np.zeros((23, 31), np.uint16)),
        _write(tmp_path / "deep.png", np.zeros((19, 17, 3), np.uint16)),
    ]
    for path in files:
        assert datasets.image_shape(path) == read_image(path, keep_depth=True).shape[:2]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert datasets.image_shape(tmp_path / "broken.png") is None
    assert datasets.image_shape(tmp_path / "missing.png") is None


def _items_with_masks(root: Path, shapes: list[tuple[int, int]]) -> list[datasets.TestItem]:
    """A good item, then one defective 40x30 image per mask shape (None: no mask file)."""
    items = [datasets.TestItem(_image(root / "good.png", (40, 30)), 0, "good", None)]
    for number, shape in enumerate(shapes):
        image = _image(root / f"crack_{number}.png", (40, 30))
        mask = _mask(root / f"crack_{number}_mask.png", shape)
        items.append(datasets.TestItem(image, 1, "crack", mask))
    return items


def test_check_masks_accepts_masks_at_the_image_aspect_and_items_without_mask(tmp_path: Path) -> None:
    items = _items_with_masks(tmp_path, [(40, 30), (80, 60), (20, 15)])
    items.append(datasets.TestItem(_image(tmp_path / "crack_x.png", (40, 30)), 1, "crack", None))
    datasets.check_masks(items)


def test_check_masks_names_every_unusable_mask_at_once(tmp_path: Path) -> None:
    items = _items_with_masks(tmp_path, [(40, 30), (30, 40), (40, 30), (40, 20)])
    truncated = items[3].mask  # crack_2's
    assert truncated is not None
    truncated.write_bytes(b"truncated")
    unreadable_image = _items_with_masks(tmp_path / "other", [(30, 40)])[1]
    unreadable_image.image.write_bytes(b"not an image")  # scoring skips it, so its mask is not checked
    with pytest.raises(datasets.DatasetError) as raised:
        datasets.check_masks([*items, unreadable_image])
    message = str(raised.value)
    assert message.startswith("3 of 5 masks cannot be used")
    assert "crack_1_mask.png is 40x30 pixels but its image" in message  # width x height
    assert "crack_3_mask.png is 20x40 pixels but its image" in message
    assert "crack_2_mask.png" in message and "not a readable mask" in message
    assert "crack_0_mask" not in message and "other" not in message


def test_a_split_naming_files_that_do_not_exist_is_an_error_naming_them(tmp_path: Path) -> None:
    # fit skipped each missing training file with a warning and evaluate each missing test image with a message, so
    # a split.json of another copy of the data trained and evaluated on whatever was left
    for name in ("Free/t1.jpg", "Free/g1.jpg", "Crack/d1.jpg"):
        _image(tmp_path / name)
    (tmp_path / "Free" / "folder.jpg").mkdir()
    root = _split_root(tmp_path, {"train": ["Free/t1.jpg", "Free/t2.jpg", "Free/folder.jpg"],
                                  "test_good": ["Free/g1.jpg", "Free/g2.jpg"],
                                  "test_defective": ["Crack/d1.jpg", "Crack/d2.jpg"]})  # fmt: skip
    split_file = re.escape(str(root / "split.json"))
    with pytest.raises(datasets.DatasetError, match=rf"{split_file}: 2 of 3 'train' files are missing") as raised:
        datasets.good_images(root)
    assert "Free/t2.jpg" in str(raised.value) and "Free/folder.jpg" in str(raised.value)
    with pytest.raises(datasets.DatasetError, match=r"1 of 2 'test_good' files are missing:\n  Free/g2\.jpg$"):
        datasets.calibration_images(root)
    with pytest.raises(datasets.DatasetError, match=r"1 of 2 'test_good' files are missing") as raised:
        datasets.test_items(root)
    assert "Crack/d2.jpg" in str(raised.value)  # every list's missing files at once


def test_a_mask_of_0_and_1_is_an_error_not_an_empty_mask(tmp_path: Path) -> None:
    # read as "pixel >= 128 is defective", a 0/1 label image marked nothing: its defective image counted in pixel
    # metrics as defect-free
    items = _items_with_masks(tmp_path, [(40, 30)])
    assert items[1].mask is not None
    labels = np.zeros((40, 30), np.uint8)
    labels[10:20, 5:15] = 1
    _write(items[1].mask, labels)
    with pytest.raises(datasets.DatasetError, match=r"crack_0_mask\.png: the mask's brightest pixel is 1"):
        datasets.check_masks(items)
    _write(items[1].mask, np.zeros((40, 30), np.uint8))  # an all-black mask is a defect nobody marked: kept
    datasets.check_masks(items)


def test_image_shape_of_a_decompression_bomb_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow refuses to open it, and image_shape then decoded the whole image with cv2 to learn its shape
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded")

    for function in ("imread", "imdecode"):
        monkeypatch.setattr(cv2, function, no_decoding)
    ihdr = (20_000).to_bytes(4, "big") + (10_000).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    png = (
        b"\x89PNG\r\n\x1a\n"
        + len(ihdr).to_bytes(4, "big")
        + b"IHDR"
        + ihdr
        + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    )
    (tmp_path / "bomb.png").write_bytes(png)
    assert datasets.image_shape(tmp_path / "bomb.png") is None


def test_a_folder_of_sub_folders_is_refused_naming_them_and_what_to_do(tmp_path: Path) -> None:
    # images in a folder per day: sub-folders are not searched (a rejects folder among them would be fitted as good)
    for day in ("2025-06-01", "2025-06-02"):
        for number in range(2):
            _image(tmp_path / "good" / day / f"cam1_{number}.png")
    _image(tmp_path / "good" / "2025-06-02" / "cam1_9.png")
    (tmp_path / "good" / ".thumbnails").mkdir()
    _image(tmp_path / "good" / ".thumbnails" / "cam1_0.png")
    for find in (datasets.good_images, datasets.calibration_images):
        with pytest.raises(datasets.DatasetError) as caught:
            find(tmp_path / "good")
        message = str(caught.value)
        assert "sub-folders are not searched" in message
        assert "its sub-folders 2025-06-01/ (2), 2025-06-02/ (3)." in message
        assert f"e.g. {tmp_path / 'good' / '2025-06-01'}" in message and '"test_good": []' in message


def test_evaluating_a_folder_without_labelled_layout_says_how_to_lay_it_out(tmp_path: Path) -> None:
    # a user's own folders: good parts and rejects side by side, no test/ folder
    _image(tmp_path / "parts" / "good" / "a.png")
    _image(tmp_path / "parts" / "rejects" / "b.JPG")
    with pytest.raises(datasets.DatasetError) as caught:
        datasets.test_items(tmp_path / "parts")
    message = str(caught.value)
    assert "(images are in its sub-folders good/ (1), rejects/ (1))" in message
    assert f"Put the labelled images in {tmp_path / 'parts'}/test/good/ (good parts) and " in message
    assert "ground_truth/<defect type>/<image name without extension>_mask.png" in message
