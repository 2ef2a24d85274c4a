import warnings
from pathlib import Path

import numpy as np
import pytest

from models.memory_bank import CompressedBankBuilder, MemoryBank, MemoryBankError, coreset_select


def _images(count: int, patches: int = 64, channels: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(12, channels))
    return [
        (centres[rng.integers(12, size=patches)] + rng.normal(0, 0.3, size=(patches, channels))).astype(np.float32)
        for _ in range(count)
    ]


def _build(images: list[np.ndarray], ratio: float = 0.5) -> MemoryBank:
    builder = CompressedBankBuilder(patches_per_image=64, compression_ratio=ratio, init_images=4)
    for patches in images:
        builder.add_image(patches)
    return builder.finish()


def test_compressed_bank_size_does_not_grow_with_training_set() -> None:
    small, large = _build(_images(10)), _build(_images(100))
    assert small.rows == large.rows == 32
    assert small.channels == large.channels == 16


def test_compressed_bank_covers_the_training_patches() -> None:
    images = _images(40)
    bank = _build(images)
    patches = np.concatenate(images)
    nearest = np.sqrt(((patches[:, None] - bank.features[None]) ** 2).sum(-1)).min(axis=1)
    spread = np.sqrt(((patches - patches.mean(0)) ** 2).sum(-1)).mean()
    assert np.percentile(nearest, 99) < 0.25 * spread


def test_compressed_bank_rejects_wrong_patch_count_and_empty_finish() -> None:
    builder = CompressedBankBuilder(patches_per_image=64, compression_ratio=1)
    with pytest.raises(MemoryBankError, match="expected"):
        builder.add_image(np.zeros((10, 16), np.float32))
    with pytest.raises(MemoryBankError, match="no training images"):
        builder.finish()


def test_coreset_is_a_k_center_cover() -> None:
    points = np.concatenate(_images(5))
    chosen = coreset_select(points, ratio=0.05, projection_dim=128)
    assert len(chosen) == int(np.ceil(0.05 * len(points)))
    assert len(set(chosen.tolist())) == len(chosen)

    def cover_radius(selected: np.ndarray) -> float:
        d = ((points[:, None] - points[selected][None]) ** 2).sum(-1)
        return float(np.sqrt(d.min(axis=1)).max())

    random_choice = np.random.default_rng(1).choice(len(points), len(chosen), replace=False)
    assert cover_radius(chosen) < cover_radius(random_choice)


def test_coreset_ratio_validated() -> None:
    with pytest.raises(MemoryBankError, match="ratio"):
        coreset_select(np.zeros((10, 4), np.float32), ratio=0.0)


def test_bank_round_trips_without_pickle(tmp_path: Path) -> None:
    bank = _build(_images(8))
    bank.save(tmp_path / "bank.npy")
    loaded = MemoryBank.load(tmp_path / "bank.npy", "compressed")
    assert np.array_equal(loaded.features, bank.features)


def test_empty_or_non_finite_bank_rejected() -> None:
    with pytest.raises(MemoryBankError, match="non-empty"):
        MemoryBank(np.zeros((0, 4), np.float32), "compressed")
    with pytest.raises(MemoryBankError, match="finite"):
        MemoryBank(np.full((2, 4), np.nan, np.float32), "compressed")


def test_reservoir_keeps_a_uniform_sample_of_bounded_size() -> None:
    from models.memory_bank import PatchReservoir

    reservoir = PatchReservoir(capacity=500, seed=3)
    for image in range(100):
        reservoir.add(np.full((50, 2), image, dtype=np.float32))  # 5,000 rows, value = image number
    sample = reservoir.sample()
    assert sample.shape == (500, 2) and reservoir.seen == 5000
    # uniform: each tenth of the images holds about a tenth of the sample (binomial sd ~ 6.7)
    counts = np.bincount((sample[:, 0] // 10).astype(int), minlength=10)
    assert counts.min() > 20 and counts.max() < 80


def test_bounded_coreset_size_does_not_grow_with_training_set_and_keeps_rare_patterns() -> None:
    from models.memory_bank import PatchReservoir, bounded_coreset

    def bank(images: list[np.ndarray], capacity: int = 2000) -> MemoryBank:
        reservoir = PatchReservoir(capacity=capacity, seed=0)
        for patches in images:
            reservoir.add(patches)
        return bounded_coreset(reservoir, rows=32)

    small, large = bank(_images(10)), bank(_images(100))
    assert small.rows == large.rows == 32 and small.kind == "bounded_coreset"
    images = _images(40)
    images[7][0] = 40.0  # one rare but normal patch far from every cluster, in a sample holding every patch
    rare = bank(images, capacity=40 * 64)
    assert np.isclose(np.abs(rare.features - 40.0).max(axis=1).min(), 0.0)


def test_bounded_coreset_with_fewer_patches_than_rows_keeps_them_all() -> None:
    from models.memory_bank import PatchReservoir, bounded_coreset

    reservoir = PatchReservoir(capacity=1000)
    reservoir.add(_images(1, patches=20)[0])
    with pytest.warns(UserWarning, match="only 20 patches were sampled for a 32-row bank"):
        assert bounded_coreset(reservoir, rows=32).rows == 20
    with warnings.catch_warnings():  # as many patches as rows (8 images at ratio 8): the bank asked for, no warning
        warnings.simplefilter("error")
        assert bounded_coreset(reservoir, rows=20).rows == 20


def test_coreset_selection_equals_a_brute_force_greedy_k_center() -> None:
    points = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    selected = coreset_select(points, 0.01, projection_dim=128)  # 16 channels: no projection, exact distances
    chosen = [int(selected[0])]
    distance = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(len(selected) - 1):
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
    assert selected.tolist() == chosen


def test_coreset_in_a_random_projection_still_covers_every_cluster() -> None:
    """64 channels projected to 8 for the greedy search (PatchCore's Johnson-Lindenstrauss step): the coreset of
    60 rows, measured in the full space, reaches every one of 40 clusters (centres ~57 apart, points ~4 from theirs),
    where a random choice of 60 rows leaves some cluster about a centre distance away."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (40, 64))
    points = (centres[rng.integers(40, size=3000)] + rng.normal(0, 0.5, (3000, 64))).astype(np.float32)

    def cover_radius(selected: np.ndarray) -> float:
        return float(np.sqrt(((points[:, None] - points[selected][None]) ** 2).sum(-1).min(axis=1)).max())

    exact = cover_radius(coreset_select(points, 0.02, projection_dim=128))  # 64 channels: no projection
    projected = cover_radius(coreset_select(points, 0.02, projection_dim=8))
    random_choice = cover_radius(np.random.default_rng(1).choice(3000, 60, replace=False))
    assert projected < 1.5 * exact < 15 < random_choice
