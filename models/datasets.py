"""Dataset layouts for fitting and evaluation.

- **MVTec AD layout**: ``ROOT/train/good/*``, ``ROOT/test/<type>/*`` (``good`` = label 0), masks at
  ``ROOT/ground_truth/<type>/<stem>_mask.png``.
- **MTD with split.json** (``../shared/datasets/mtd``): ``ROOT/split.json`` lists ``train``, ``test_good`` and
  ``test_defective`` paths relative to ROOT; each defective ``X.jpg`` has its mask ``X.png`` beside it.
- **A plain folder of good images** (for ``fit --good`` / ``calibrate --good``).

``good_images(path)`` and ``test_items(path)`` recognise the layout themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.images import ImageError, list_images

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class TestItem:
    image: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask: Path | None  # None for good images (all-zero mask)


class DatasetError(ValueError):
    """A dataset folder that does not follow any supported layout."""


def _read_split(root: Path) -> dict[str, list[str]]:
    try:
        split = json.loads((root / SPLIT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        msg = f"{root / SPLIT_FILE}: cannot read the split ({error})"
        raise DatasetError(msg) from None
    missing = [key for key in ("train", "test_good", "test_defective") if key not in split]
    if missing:
        msg = f"{root / SPLIT_FILE}: missing keys {missing}"
        raise DatasetError(msg)
    return split


def good_images(path: Path) -> list[Path]:
    """Good training images: split.json's ``train``, MVTec's ``train/good``, or the images in a folder."""
    path = Path(path)
    if (path / SPLIT_FILE).is_file():
        return [path / relative for relative in _read_split(path)["train"]]
    if (path / "train" / "good").is_dir():
        return list_images(path / "train" / "good")
    try:
        images = list_images(path)
    except ImageError as error:
        raise DatasetError(str(error)) from None
    if not images:
        msg = f"{path}: no images found (expected image files, train/good/, or {SPLIT_FILE})"
        raise DatasetError(msg)
    return images


def test_items(path: Path) -> list[TestItem]:
    """Labelled test images with their masks, from split.json or the MVTec layout."""
    path = Path(path)
    if (path / SPLIT_FILE).is_file():
        split = _read_split(path)
        items = [TestItem(path / rel, 0, "good", None) for rel in split["test_good"]]
        for relative in split["test_defective"]:
            image = path / relative
            items.append(TestItem(image, 1, Path(relative).parts[0], image.with_suffix(".png")))
        return items
    test_root = path / "test"
    if not test_root.is_dir():
        msg = f"{path}: expected {SPLIT_FILE} or an MVTec layout with test/<type>/ folders"
        raise DatasetError(msg)
    items = []
    for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        for image in list_images(type_dir):
            if type_dir.name == "good":
                items.append(TestItem(image, 0, "good", None))
            else:
                mask = path / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                items.append(TestItem(image, 1, type_dir.name, mask if mask.is_file() else None))
    if not items:
        msg = f"{test_root}: no test images found"
        raise DatasetError(msg)
    return items
