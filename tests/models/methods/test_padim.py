"""PaDiM's own ideas: a reproducible random channel subset, per-position Gaussians from one streaming pass equal
to the ones computed from all embeddings at once (+ epsilon I), and a map that peaks where a part differs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from models.methods.padim import PadimMethod, build_extractor, embed, random_channels
from pipeline.config import config_from_mapping


class _Batches:
    """Re-iterable ``(B, 3, S, S)`` batches of fixed tensors (the ``ImageBatches`` protocol)."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self._images = images
        self._batch_size = batch_size

    @property
    def images(self) -> int:
        return int(self._images.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._images.split(self._batch_size))


def _stripes(count: int, size: int, seed: int) -> torch.Tensor:
    """Good parts: horizontal stripes with small random phase and noise, ``(count, 3, size, size)`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(size, dtype=torch.float32)[None, :, None]
    phase = torch.rand(count, 1, 1, generator=generator) * 2
    stripes = 0.5 + 0.3 * torch.sin((rows + phase) * 0.5)
    noise = 0.03 * torch.randn(count, size, size, generator=generator)
    return (stripes + noise).clamp(0, 1)[:, None].expand(count, 3, size, size).contiguous()


def test_the_random_channel_subset_is_reproducible_distinct_and_sorted() -> None:
    first, again, other = (
        random_channels(152, 100, seed=0),
        random_channels(152, 100, seed=0),
        random_channels(152, 100, seed=1),
    )
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.unique().numel() == 100 and bool((first[1:] > first[:-1]).all()) and int(first.max()) < 152
    assert torch.equal(random_channels(40, 100, seed=0), torch.arange(40))  # fewer channels than asked: all of them
    with pytest.raises(ValueError, match="at least 1"):
        random_channels(40, 0, seed=0)


def test_streamed_gaussians_equal_the_ones_from_all_embeddings_at_once() -> None:
    config = config_from_mapping({"model": {"method": "padim", "image_size": 64, "aggregation_kernel": 1},
                                  "padim": {"channels": 8, "seed": 3}})  # fmt: skip
    images = _stripes(24, 64, seed=0)
    method = PadimMethod.fit(_Batches(images, 3), config, torch.device("cpu"), progress=False)
    assert method.grid == (8, 8) and method.mean.shape == (64, 8)
    extractor = build_extractor(config.model, torch.device("cpu"))
    patches = embed(extractor, images, method.channel_indices).double()  # (24, 64, 8)
    torch.testing.assert_close(method.mean, patches.mean(dim=0).float(), rtol=1e-5, atol=1e-5)
    for position in (0, 27, 63):
        covariance = torch.cov(patches[:, position].T) + 0.01 * torch.eye(8, dtype=torch.float64)
        expected = torch.linalg.inv(covariance).float()
        torch.testing.assert_close(method.precision[position], expected, rtol=1e-3, atol=1e-3)


def test_the_map_peaks_where_the_part_differs() -> None:
    config = config_from_mapping({"model": {"method": "padim", "image_size": 96, "aggregation_kernel": 1}})
    method = PadimMethod.fit(_Batches(_stripes(24, 96, seed=1), 8), config, torch.device("cpu"), progress=False)
    test = _stripes(2, 96, seed=2)
    test[1, :, 56:72, 16:32] = 1.0  # a bright square on the second part
    output = method.score_views(test, config.scoring)
    assert output.view_scores is None and output.patch_maps.shape == (2, 12, 12)
    maps = output.patch_maps
    peak = int(maps[1].flatten().argmax())
    row, column = divmod(peak, 12)
    assert 6 <= row <= 9 and 1 <= column <= 4  # the square covers grid cells 7-8 x 2-3
    assert float(maps[1].max()) > 2 * float(maps[0].max())


def test_pooled_gaussians_are_those_of_the_neighbours_samples_together() -> None:
    from models.methods.gaussian_stats import pool_neighbours

    grid, samples = (4, 5), torch.randn(50, 20, 3, dtype=torch.float64)  # 50 samples at each of 20 positions
    samples += torch.arange(20, dtype=torch.float64)[None, :, None]  # every position its own mean
    mean = samples.mean(dim=0)
    centred = samples - mean
    covariance = torch.einsum("npi,npj->pij", centred, centred) / 50  # biased: the mixture identity is then exact
    pooled_mean, pooled = pool_neighbours(mean, covariance, grid, radius=1)
    for position in (0, 7, 19):  # a corner (4 neighbours incl. itself), an inner one (9), the last corner
        row, column = divmod(position, grid[1])
        neighbours = [r * grid[1] + c for r in range(row - 1, row + 2) for c in range(column - 1, column + 2)
                      if 0 <= r < grid[0] and 0 <= c < grid[1]]  # fmt: skip
        together = samples[:, neighbours].reshape(-1, 3)
        expected = torch.cov(together.T, correction=0)
        assert torch.allclose(pooled_mean[position], together.mean(dim=0))
        assert torch.allclose(pooled[position], expected, atol=1e-10)
    assert float(pooled[7].trace()) > float(covariance[7].trace()) + 1.0  # the neighbours' means add spread
    same_mean, same_covariance = pool_neighbours(mean, covariance, grid, radius=0)
    assert same_mean is mean and same_covariance is covariance


def _pattern(count: int, size: int, seed: int) -> torch.Tensor:
    """Good parts: one fixed smooth 2-D pattern plus a little noise, ``(count, 3, size, size)`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    columns = torch.arange(size, dtype=torch.float32)[None, :]
    pattern = 0.5 + 0.25 * torch.sin(rows * 0.11 + columns * 0.05) * torch.cos(columns * 0.07)
    noisy = (pattern + 0.02 * torch.randn(count, size, size, generator=generator)).clamp(0, 1)
    return noisy[:, None].expand(count, 3, size, size).contiguous()


def test_an_inference_radius_forgives_a_part_displaced_by_one_cell() -> None:
    config = config_from_mapping({"model": {"method": "padim", "image_size": 96, "aggregation_kernel": 1},
                                  "padim": {"channels": 16}})  # fmt: skip
    fitted = PadimMethod.fit(_Batches(_pattern(24, 96, seed=1), 8), config, torch.device("cpu"), progress=False)
    settings = fitted.settings.model_copy(update={"inference_radius": 1})
    tolerant = PadimMethod(fitted.extractor, fitted.channel_indices, fitted.mean, fitted.precision, fitted.grid,
                           settings, fitted.image_size)  # fmt: skip
    inner = (slice(2, -2), slice(2, -2))  # away from the wrapped rows and the zero padding at the borders
    in_place = _pattern(1, 96, seed=2)
    displaced = in_place.roll(8, dims=2)  # down by one stride-8 grid cell
    strict_in_place = float(fitted.score_views(in_place, config.scoring).patch_maps[0][inner].mean())
    strict_map = fitted.score_views(displaced, config.scoring).patch_maps[0]
    tolerant_map = tolerant.score_views(displaced, config.scoring).patch_maps[0]
    strict_displaced, tolerant_displaced = float(strict_map[inner].mean()), float(tolerant_map[inner].mean())
    assert strict_displaced - tolerant_displaced > 0.5 * (strict_displaced - strict_in_place)
    assert bool((tolerant_map <= strict_map + 1e-4).all())  # its own Gaussian is among the candidates
    # each cell's distance is the smallest to the Gaussians of the cells around it
    patches = embed(fitted.extractor, displaced, fitted.channel_indices)[0].double()  # (144, 16)
    row, column = 6, 5
    candidates = []
    for r in range(row - 1, row + 2):
        for c in range(column - 1, column + 2):
            centred = patches[row * 12 + column] - fitted.mean[r * 12 + c].double()
            candidates.append(float(centred @ fitted.precision[r * 12 + c].double() @ centred) ** 0.5)
    assert float(tolerant_map[row, column]) == pytest.approx(min(candidates), rel=1e-4)
