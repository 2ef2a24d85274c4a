"""Synthetic defects: every kind marks a region and changes it there; ``strength`` makes it subtler."""

import numpy as np
import pytest
import skimage.data

from models.synthetic import DEFECT_KINDS, LARGE_KINDS, SURFACE_KINDS, add_synthetic_defect


@pytest.fixture(scope="module")
def part() -> np.ndarray:
    grey = skimage.data.brick()[:160, :200]
    return np.repeat(grey[:, :, None], 3, axis=2)


@pytest.mark.parametrize("kind", DEFECT_KINDS + SURFACE_KINDS)
def test_each_kind_changes_the_image_inside_its_mask(part: np.ndarray, kind: str) -> None:
    defective, mask = add_synthetic_defect(part, np.random.default_rng(3), kind=kind)
    assert defective.shape == part.shape and defective.dtype == np.uint8
    assert mask.shape == part.shape[:2] and 0 < mask.sum() < mask.size // 4
    change = np.abs(defective.astype(int) - part.astype(int)).sum(axis=2)
    assert change[mask].mean() > 10
    if kind not in ("blob", "hole", "stain"):  # soft edges reach just past the half-strength mask
        assert change[~mask].max() == 0


@pytest.mark.parametrize("kind", LARGE_KINDS)
def test_large_kinds_cover_a_large_share_of_the_frame_and_change_it(part: np.ndarray, kind: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        defective, mask = add_synthetic_defect(part, rng, kind=kind, anywhere=True)
        assert 0.05 < mask.mean() < 0.6
        change = np.abs(defective.astype(int) - part.astype(int)).sum(axis=2)
        assert change[mask].mean() > 10
        if kind != "large_stain":  # soft edges reach just past the half-strength mask
            assert change[~mask].max() == 0


@pytest.mark.parametrize("kind", DEFECT_KINDS + SURFACE_KINDS + LARGE_KINDS)
def test_lower_strength_gives_the_same_region_with_less_contrast(part: np.ndarray, kind: str) -> None:
    strong, strong_mask = add_synthetic_defect(part, np.random.default_rng(5), kind=kind)
    subtle, subtle_mask = add_synthetic_defect(part, np.random.default_rng(5), kind=kind, strength=0.4)
    assert np.array_equal(strong_mask, subtle_mask)
    region = strong_mask
    strong_change = np.abs(strong.astype(int) - part.astype(int))[region].mean()
    subtle_change = np.abs(subtle.astype(int) - part.astype(int))[region].mean()
    assert 0 < subtle_change < 0.7 * strong_change


def test_strength_outside_zero_to_one_is_refused(part: np.ndarray) -> None:
    with pytest.raises(ValueError, match="strength"):
        add_synthetic_defect(part, np.random.default_rng(0), strength=1.5)


def _touches_border_band(mask: np.ndarray, band: float = 0.1) -> bool:
    height, width = mask.shape
    rows, cols = round(band * height), round(band * width)
    return bool(mask[:rows].any() or mask[-rows:].any() or mask[:, :cols].any() or mask[:, -cols:].any())


def test_anywhere_also_puts_defects_on_the_borders(part: np.ndarray) -> None:
    rng_centre, rng_anywhere = np.random.default_rng(7), np.random.default_rng(7)
    centre = [add_synthetic_defect(part, rng_centre, kind="blob")[1] for _ in range(30)]
    anywhere = [add_synthetic_defect(part, rng_anywhere, kind="blob", anywhere=True)[1] for _ in range(30)]
    assert not any(_touches_border_band(mask) for mask in centre)
    assert sum(_touches_border_band(mask) for mask in anywhere) >= 5


def test_a_chip_always_sits_on_an_edge_even_when_defects_are_central(part: np.ndarray) -> None:
    rng = np.random.default_rng(11)
    masks = [add_synthetic_defect(part, rng, kind="chip")[1] for _ in range(20)]
    assert all(_touches_border_band(mask, band=0.02) for mask in masks)


def test_a_crack_stays_thin_on_a_large_image() -> None:
    large = np.full((800, 1000, 3), 128, np.uint8)
    _, mask = add_synthetic_defect(large, np.random.default_rng(2), kind="crack")
    rows = mask.any(axis=1).sum() + mask.any(axis=0).sum()
    assert 0 < mask.sum() <= 3 * rows  # about one to two pixels across, whatever the image size


def test_kinds_limits_the_random_choice(part: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    for _ in range(10):
        _, mask = add_synthetic_defect(part, rng, kinds=("chip",))
        assert _touches_border_band(mask, band=0.02)
