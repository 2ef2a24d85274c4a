"""Dataset layouts for fitting and evaluation.

- **MVTec AD layout**: ``ROOT/train/good/*``, ``ROOT/test/<type>/*`` (``good`` = label 0), masks at
  ``ROOT/ground_truth/<type>/<stem>_mask.png``.
- **MTD with split.json** (``../shared/datasets/mtd``): ``ROOT/split.json`` lists ``train``, ``test_good`` and
  ``test_defective`` paths relative to ROOT. A defective image's mask is the one an optional ``masks`` object
  names (``{"image relative path": "mask relative path"}``), else the same-stem ``X.png`` beside it (MTD's
  ``X.jpg`` has its mask ``X.png``) when that is a file other than the image itself.
- **A plain folder of good images** (for ``fit --good`` / ``calibrate --good``).

``good_images(path)``, ``test_items(path)`` and ``calibration_images(path)`` recognise the layout themselves.
A defective image without a mask file gets ``mask=None``: the report leaves it out of pixel metrics and counts it.
``check_masks(items)`` checks every mask against its image (readable, same aspect ratio) before anything is scored.
A split.json naming files that do not exist is an error naming them, before anything is fitted or scored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image

from models.images import ImageError, list_images, read_image, read_mask

SPLIT_FILE = "split.json"
SPLIT_LISTS = ("train", "test_good", "test_defective")
MASKS_KEY = "masks"
# A mask may be a rescaled copy of its image's grid; beyond this relative difference of width/height (and beyond
# one pixel of rounding) it cannot be laid over the image.
MASK_ASPECT_TOLERANCE = 0.02
NAMED_MASK_PROBLEMS = 20  # masks a failed check names one by one
NAMED_MISSING_FILES = 20  # files a split names but its folder lacks, named one by one


@dataclass(frozen=True)
class TestItem:
    image: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask: Path | None  # good images: None (an all-zero mask); defective: None when no mask file is known

    @property
    def has_mask(self) -> bool:
        """Whether the item's pixels have a known ground truth: good images always (all zero), defective ones only
        with a mask file."""
        return self.label == 0 or self.mask is not None


class DatasetError(ValueError):
    """A dataset folder that does not follow any supported layout."""


@dataclass(frozen=True)
class _Split:
    train: list[str]
    test_good: list[str]
    test_defective: list[str]
    masks: dict[str, str]


def _relative_paths(split_file: Path, key: str, value: Any) -> list[str]:
    expected = f"{split_file}: '{key}' must be a list of image paths (relative to its folder, or absolute)"
    if not isinstance(value, list):
        msg = f"{expected}, got {type(value).__name__} {json.dumps(value)[:60]}"
        raise DatasetError(msg)
    for position, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            msg = f"{expected}; entry {position} is {json.dumps(entry)[:60]}"
            raise DatasetError(msg)
    return value


def _read_split(root: Path) -> _Split:
    split_file = root / SPLIT_FILE
    try:
        split = json.loads(split_file.read_bytes())
    except OSError as error:
        msg = f"{split_file}: cannot read the split ({error.strerror or error})"
        raise DatasetError(msg) from None
    except UnicodeDecodeError as error:
        msg = f"{split_file}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 JSON"
        raise DatasetError(msg) from None
    except json.JSONDecodeError as error:
        msg = f"{split_file}: not valid JSON ({error})"
        raise DatasetError(msg) from None
    if not isinstance(split, dict):
        msg = f"{split_file}: expected a JSON object with keys {list(SPLIT_LISTS)}, got {type(split).__name__}"
        raise DatasetError(msg)
    missing = [key for key in SPLIT_LISTS if key not in split]
    if missing:
        msg = f"{split_file}: missing keys {missing}"
        raise DatasetError(msg)
    lists = {key: _relative_paths(split_file, key, split[key]) for key in SPLIT_LISTS}
    masks = split.get(MASKS_KEY, {})
    expected = f"{split_file}: '{MASKS_KEY}' must map image paths to mask paths (relative to its folder, or absolute)"
    if not isinstance(masks, dict):
        msg = f"{expected}, got {type(masks).__name__}"
        raise DatasetError(msg)
    defective = set(lists["test_defective"])
    for image, mask in masks.items():
        if image not in defective:
            msg = f"{expected}; {json.dumps(image)} is not in 'test_defective'"
            raise DatasetError(msg)
        if not isinstance(mask, str) or not mask:
            msg = f"{expected}; {json.dumps(image)} maps to {json.dumps(mask)[:60]}"
            raise DatasetError(msg)
        if Path(mask) == Path(image):
            msg = f"{expected}; {json.dumps(image)} maps to itself"
            raise DatasetError(msg)
    return _Split(lists["train"], lists["test_good"], lists["test_defective"], masks)


def _split_files(root: Path, split: _Split, keys: Sequence[str]) -> dict[str, list[Path]]:
    """The files of split.json's ``keys`` lists; raises DatasetError naming those that are not files (every list's
    at once), rather than leave fit and evaluate to skip them one warning at a time."""
    files = {key: [root / relative for relative in getattr(split, key)] for key in keys}
    problems = []
    for key, paths in files.items():
        missing = [
            str(relative) for relative, path in zip(getattr(split, key), paths, strict=True) if not path.is_file()
        ]
        if missing:
            named = "\n  ".join(missing[:NAMED_MISSING_FILES])
            more = f"\n  and {len(missing) - NAMED_MISSING_FILES} more" if len(missing) > NAMED_MISSING_FILES else ""
            problems.append(f"{len(missing)} of {len(paths)} '{key}' files are missing:\n  {named}{more}")
    if problems:
        msg = f"{root / SPLIT_FILE}: " + "\n".join(problems)
        raise DatasetError(msg)
    return files


def _split_mask(root: Path, split: _Split, relative: str) -> Path | None:
    """The mask file of a split.json defective image, or None when it has none (never the image itself)."""
    image = root / relative
    if relative in split.masks:
        mask = root / split.masks[relative]
    elif image.suffix.lower() == ".png":  # its same-stem .png is the image: a PNG dataset needs a "masks" mapping
        return None
    else:
        mask = image.with_suffix(".png")
    if not mask.is_file() or (image.exists() and mask.samefile(image)):
        return None
    return mask


def mask_shape_problem(mask: Path, mask_shape: tuple[int, int], image: Path,
                       image_shape: tuple[int, int]) -> str | None:  # fmt: skip
    """Why a ``(height, width)`` mask cannot be laid over its image, or None when it can (the same size, or another
    resolution with the same aspect ratio within rounding: it is resized)."""
    (mask_height, mask_width), (image_height, image_width) = mask_shape, image_shape
    if (mask_height, mask_width) == (image_height, image_width):
        return None
    width_scale, height_scale = mask_width / image_width, mask_height / image_height
    relative = abs(width_scale - height_scale) / max(width_scale, height_scale)
    rounding = max(1.0 / mask_width, 1.0 / mask_height)  # one pixel of either side
    if relative <= max(MASK_ASPECT_TOLERANCE, rounding):
        return None
    return (f"mask {mask} is {mask_width}x{mask_height} pixels but its image {image} is {image_width}x{image_height}: "
            "a different aspect ratio, so the mask cannot be laid over the image")  # fmt: skip


def image_shape(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of an image file from its header (nothing decoded), or None when it cannot be read.
    Read as ``models.images.read_image`` reads files: the stored orientation, EXIF rotation ignored; a file Pillow
    cannot open is read by ``read_image`` (which refuses a decompression bomb from its header)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                width, height = image.size
        return height, width
    except PIL.Image.DecompressionBombError:
        return None  # read_image refuses it too: more pixels than models.images.MAX_FILE_PIXELS
    except (OSError, ValueError):
        try:
            return read_image(path, keep_depth=True).shape[:2]
        except ImageError:
            return None


def check_masks(items: Sequence[TestItem]) -> None:
    """Before anything is scored: raise DatasetError naming every defective item's mask that cannot be read or
    cannot be laid over its image (another aspect ratio than the image's). Images come from their headers, masks are
    read whole (they are small). Items without a mask file are not errors (pixel metrics leave them out), nor are
    images that cannot be read (scoring skips them)."""
    problems: list[str] = []
    for item in items:
        if item.mask is None:
            continue
        shape = image_shape(item.image)
        if shape is None:
            continue
        try:
            mask = read_mask(item.mask)
        except ImageError as error:
            problems.append(f"mask {item.mask} of {item.image}: {error}")
            continue
        problem = mask_shape_problem(item.mask, (mask.shape[0], mask.shape[1]), item.image, shape)
        if problem is not None:
            problems.append(problem)
    if problems:
        listed = "\n  ".join(problems[:NAMED_MASK_PROBLEMS])
        more = f"\n  and {len(problems) - NAMED_MASK_PROBLEMS} more" if len(problems) > NAMED_MASK_PROBLEMS else ""
        msg = (f"{len(problems)} of {sum(item.mask is not None for item in items)} masks cannot be used; fix or "
               f"replace them (nothing was scored):\n  {listed}{more}")  # fmt: skip
        raise DatasetError(msg)


def good_images(path: Path) -> list[Path]:
    """Good training images: split.json's ``train``, MVTec's ``train/good``, or the images in a folder."""
    path = Path(path)
    if (path / SPLIT_FILE).is_file():
        return _split_files(path, _read_split(path), ["train"])["train"]
    if (path / "train" / "good").is_dir():
        return list_images(path / "train" / "good")
    return _folder_images(path)


def _folder_images(path: Path) -> list[Path]:
    try:
        images = list_images(path)
    except ImageError as error:
        raise DatasetError(str(error)) from None
    if not images:
        held = _subfolder_images(path)
        if not held:
            msg = f"{path}: no images found (expected image files, train/good/, or {SPLIT_FILE})"
            raise DatasetError(msg)
        example = path / next(iter(held))
        msg = (f"{path}: no images in the folder itself, and sub-folders are not searched (a folder of rejects "
               f"among them would be taken for good parts); {_listed(held)}. Pass a folder whose images are all "
               f"good parts (e.g. {example}), or list the good ones in {path / SPLIT_FILE}, relative to it: "
               '{"train": ["day1/a.png", ...], "test_good": [], "test_defective": []}')  # fmt: skip
        raise DatasetError(msg)
    return images


NAMED_SUBFOLDERS = 5  # sub-folders holding images that a layout error names


def _subfolder_images(path: Path) -> dict[str, int]:
    """How many image files each sub-folder of ``path`` holds directly (hidden ones left out; one level only, so a
    mistaken ``--good ~`` answers at once), for sub-folders that hold any; by name."""
    counts: dict[str, int] = {}
    for folder in sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")):
        if count := len(list_images(folder)):
            counts[folder.name] = count
    return counts


def _listed(held: dict[str, int]) -> str:
    """``held`` (sub-folder: images) in words."""
    named = [f"{name}/ ({count})" for name, count in list(held.items())[:NAMED_SUBFOLDERS]]
    more = f" and {len(held) - NAMED_SUBFOLDERS} more" if len(held) > NAMED_SUBFOLDERS else ""
    return f"images are in its sub-folders {', '.join(named)}{more}"


def is_dataset_root(path: Path) -> bool:
    """True for a split.json or MVTec-layout root (as opposed to a plain folder of images)."""
    path = Path(path)
    return (path / SPLIT_FILE).is_file() or (path / "train" / "good").is_dir() or (path / "test").is_dir()


def calibration_images(path: Path) -> tuple[list[Path], str]:
    """Good images to calibrate a threshold on, and a short description of them for the user.

    A dataset root gives its held-out good images, never its training ones (the model was fitted on those, so
    their scores are too low): split.json's ``test_good`` or MVTec's ``test/good``. A plain folder gives its images.
    """
    path = Path(path)
    if (path / SPLIT_FILE).is_file():
        images = _split_files(path, _read_split(path), ["test_good"])["test_good"]
        if not images:
            msg = (f"{path / SPLIT_FILE}: 'test_good' is empty, and 'train' was used for fitting: pass a folder of "
                   "good images the model was not fitted on")  # fmt: skip
            raise DatasetError(msg)
        return images, f"held-out good images of {path} ({SPLIT_FILE} test_good)"
    if (path / "train" / "good").is_dir() or (path / "test").is_dir():
        held_out = path / "test" / "good"
        images = list_images(held_out) if held_out.is_dir() else []
        if not images:
            msg = (f"{path}: no held-out good images in test/good/ (train/good/ was used for fitting): pass a folder "
                   "of good images the model was not fitted on")  # fmt: skip
            raise DatasetError(msg)
        return images, f"held-out good images of {path} (test/good)"
    return _folder_images(path), f"good images in {path}"


def test_items(path: Path) -> list[TestItem]:
    """Labelled test images with their masks, from split.json or the MVTec layout."""
    path = Path(path)
    if (path / SPLIT_FILE).is_file():
        split = _read_split(path)
        files = _split_files(path, split, ["test_good", "test_defective"])
        items = [TestItem(image, 0, "good", None) for image in files["test_good"]]
        for relative in split.test_defective:
            mask = _split_mask(path, split, relative)
            items.append(TestItem(path / relative, 1, Path(relative).parts[0], mask))
        return items
    test_root = path / "test"
    if not test_root.is_dir():
        held = _subfolder_images(path) if path.is_dir() else {}
        found = f" ({_listed(held)})" if held else ""
        msg = (f"{path}: expected {SPLIT_FILE} or an MVTec layout with test/<type>/ folders{found}. Put the labelled "
               f"images in {path}/test/good/ (good parts) and {path}/test/<defect type>/ (one folder per type; a "
               "mask is optional, as ground_truth/<defect type>/<image name without extension>_mask.png), or list "
               f"them in {path / SPLIT_FILE}")  # fmt: skip
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
