"""N-pad's own ideas: Bhattacharyya similarity between position Gaussians, the neighbour-weighted mixture, channel
selection by sparsity, and the min-over-neighbours Mahalanobis distance that absorbs a small misalignment."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_scorer
from models.errors import ArtifactError
from models.fit import TrainingImages, fit_scorer
from models.images import read_image
from models.methods import npad
from models.methods.npad import (
    GaussianSums,
    bhattacharyya_distance,
    gaussians_from_sums,
    neighbour_weights,
    sparsest_channels,
    weighted_gaussians,
)
from models.methods.position_grid import min_neighbour_mahalanobis, neighbour_offsets, whitening_matrices
from models.scorer import Scorer
from models.synthetic import DemoLine
from pipeline.config import NpadSettings, config_from_mapping
from tests.models.conftest import TINY

FAST_NPAD = {"channels": 48, "train_radius": 1, "kmeans_sample": 1024}


def _gaussian(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(channels, generator=generator, dtype=torch.float64)
    root = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    return mean, root @ root.T / channels + 0.5 * torch.eye(channels, dtype=torch.float64)


# -- Bhattacharyya distance ------------------------------------------------------------------------------------


def test_bhattacharyya_distance_of_identical_gaussians_is_zero() -> None:
    mean, cov = _gaussian(16, seed=0)
    assert bhattacharyya_distance(mean, cov, mean, cov).item() == pytest.approx(0.0, abs=1e-9)


def test_bhattacharyya_distance_grows_with_separation_and_is_symmetric() -> None:
    mean, cov = _gaussian(16, seed=1)
    direction = torch.ones(16, dtype=torch.float64) / 4
    distances = [bhattacharyya_distance(mean, cov, mean + step * direction, cov).item() for step in (0.5, 1, 2, 4)]
    assert all(a < b for a, b in itertools.pairwise(distances)) and distances[0] > 0
    other_mean, other_cov = _gaussian(16, seed=2)
    forward = bhattacharyya_distance(mean, cov, other_mean, other_cov)
    assert forward.item() == pytest.approx(bhattacharyya_distance(other_mean, other_cov, mean, cov).item())
    assert bhattacharyya_distance(mean, cov, mean, 3 * cov).item() > 0  # same mean, different spread


def test_bhattacharyya_distance_matches_the_one_dimensional_closed_form() -> None:
    mean_a, var_a, mean_b, var_b = 0.3, 2.0, 1.7, 0.5
    expected = (mean_a - mean_b) ** 2 / (4 * (var_a + var_b)) + 0.5 * math.log(
        (var_a + var_b) / (2 * math.sqrt(var_a * var_b))
    )
    got = bhattacharyya_distance(torch.tensor([mean_a]), torch.tensor([[var_a]]), torch.tensor([mean_b]),
                                 torch.tensor([[var_b]]))  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-6)


# -- neighbour weighting ---------------------------------------------------------------------------------------


def test_neighbour_weights_trust_similar_neighbours_and_ignore_different_ones() -> None:
    mean, cov = _gaussian(4, seed=3)
    means = mean.repeat(9, 1)  # 3 x 3 grid of identical Gaussians ...
    means[8] += 50.0  # ... except the bottom-right one
    covariances = cov.repeat(9, 1, 1)
    weights = neighbour_weights(means, covariances, (3, 3), radius=1, temperature=1.0)
    offsets = neighbour_offsets(1)
    centre = 4  # position (1, 1)
    assert weights[offsets.index((0, 0)), 1, 1] == 1.0
    assert weights[offsets.index((0, -1)), 1, 1].item() == pytest.approx(1.0)  # identical left neighbour
    assert weights[offsets.index((1, 1)), 1, 1].item() < 1e-6  # the different one
    assert weights[offsets.index((-1, -1)), 0, 0] == 0.0  # off the grid
    mixed_means, mixed_cov = weighted_gaussians(means, covariances, weights, (3, 3), radius=1)
    torch.testing.assert_close(mixed_means[centre], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed_cov[centre], cov, rtol=0, atol=1e-6)


def test_weighted_mixture_widens_where_neighbours_disagree_moderately() -> None:
    """Two neighbouring Gaussians a little apart: the mixture's covariance gains the spread of their means."""
    cov = torch.eye(2, dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    covariances = cov.repeat(2, 1, 1)
    weights = neighbour_weights(means, covariances, (1, 2), radius=1, temperature=1.0)
    similarity = math.exp(-(0.5**2) / 8)  # D_B with equal covariances: |d|^2 / 8
    assert weights[neighbour_offsets(1).index((0, 1)), 0, 0].item() == pytest.approx(similarity)
    mixed_means, mixed_cov = weighted_gaussians(means, covariances, weights, (1, 2), radius=1)
    share = similarity / (1 + similarity)
    assert mixed_means[0, 0].item() == pytest.approx(0.5 * share)
    assert mixed_cov[0, 0, 0].item() == pytest.approx(1 + 0.25 * share * (1 - share))
    assert mixed_cov[0, 1, 1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("radius", [1, 2])
def test_neighbour_weighted_gaussians_equal_the_papers_mixture_written_out(radius: int) -> None:
    """Every position p of a 3 x 4 grid of random Gaussians: weights exp(-D_B(p, q) / T) for each q within Chebyshev
    ``radius`` on the grid (1 for q = p), D_B from numpy's determinants and inverse, and the moment-matched mixture
    mu_p = sum w mu_q / W, Sigma_p = sum w (Sigma_q + mu_q mu_q^T) / W - mu_p mu_p^T, all in plain loops."""
    height, width, channels, temperature = 3, 4, 3, 2.0
    pairs = [_gaussian(channels, seed) for seed in range(height * width)]
    means = torch.stack([mean for mean, _ in pairs])
    covariances = torch.stack([cov for _, cov in pairs])
    mu, sigma = means.numpy(), covariances.numpy()

    def bhattacharyya(a: int, b: int) -> float:
        pooled = (sigma[a] + sigma[b]) / 2
        difference = mu[a] - mu[b]
        determinants = np.linalg.det(pooled) / math.sqrt(np.linalg.det(sigma[a]) * np.linalg.det(sigma[b]))
        return float(difference @ np.linalg.inv(pooled) @ difference / 8 + math.log(determinants) / 2)

    weights = neighbour_weights(means, covariances, (height, width), radius, temperature)
    mixed_means, mixed_cov = weighted_gaussians(means, covariances, weights, (height, width), radius)
    for y, x in itertools.product(range(height), range(width)):
        p = y * width + x
        expected_mean, second, total = np.zeros(channels), np.zeros((channels, channels)), 0.0
        for position, (dy, dx) in enumerate(neighbour_offsets(radius)):
            if not (0 <= y + dy < height and 0 <= x + dx < width):
                assert weights[position, y, x] == 0.0  # off the grid
                continue
            q = (y + dy) * width + x + dx
            weight = 1.0 if q == p else math.exp(-bhattacharyya(p, q) / temperature)
            assert weights[position, y, x].item() == pytest.approx(weight, rel=1e-9)
            expected_mean += weight * mu[q]
            second += weight * (sigma[q] + np.outer(mu[q], mu[q]))
            total += weight
        expected_mean /= total
        np.testing.assert_allclose(mixed_means[p].numpy(), expected_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mixed_cov[p].numpy(), second / total - np.outer(expected_mean, expected_mean),
                                   rtol=1e-9, atol=1e-12)  # fmt: skip


# -- channel selection -----------------------------------------------------------------------------------------


def test_sparsest_channels_keeps_the_channels_with_fewest_activations() -> None:
    counts = np.array([50, 3, 7, 100, 0, 7, 2])
    np.testing.assert_array_equal(sparsest_channels(counts, 3), [1, 4, 6])
    np.testing.assert_array_equal(sparsest_channels(counts, 4), [1, 2, 4, 6])  # tie at 7: lower index first
    with pytest.raises(ValueError, match="cannot keep 8 of 7"):
        sparsest_channels(counts, 8)


def test_fit_keeps_the_backbone_channels_that_fire_least_on_the_training_images(demo_line: DemoLine) -> None:
    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "npad"}, "npad": FAST_NPAD})
    images = TrainingImages(sorted(demo_line.train_dir.iterdir()), 96, 4)
    method = npad.NpadMethod.fit(images, config, torch.device("cpu"), progress=False)
    counts = sum(
        (npad.embed_on_device(method.extractor, batch) > 0).sum(dim=(0, 2, 3)).numpy() for batch in images
    )  # independent count over the same images
    assert isinstance(counts, np.ndarray)  # not sum()'s start value 0: there are training images
    kept = method.channels
    assert kept.size == 48
    assert counts[kept].max() <= np.delete(counts, kept).min()  # every kept channel fires no more than any dropped


def test_one_and_two_pass_fits_agree(demo_line: DemoLine, monkeypatch: pytest.MonkeyPatch) -> None:
    """All-channel sums selected afterwards == sums over channels chosen in a first counting pass."""
    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "npad"}, "npad": FAST_NPAD})
    images = TrainingImages(sorted(demo_line.train_dir.iterdir())[:6], 96, 4)
    one_pass = npad.NpadMethod.fit(images, config, torch.device("cpu"), progress=False)
    monkeypatch.setattr(npad, "ALL_CHANNEL_SUMS_BUDGET", 0)
    two_pass = npad.NpadMethod.fit(images, config, torch.device("cpu"), progress=False)
    np.testing.assert_array_equal(one_pass.channels, two_pass.channels)
    torch.testing.assert_close(one_pass.pixel.whitening, two_pass.pixel.whitening, rtol=1e-4, atol=1e-5)
    assert one_pass.centroids is not None and two_pass.centroids is not None  # the default geometric_mean score
    np.testing.assert_allclose(one_pass.centroids, two_pass.centroids, rtol=1e-4, atol=1e-4)


def test_running_sums_give_the_per_position_mean_and_covariance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GaussianSums, "FLUSH_IMAGES", 4)  # several float32 -> float64 flushes
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(11, 3, 2, 2, generator=generator) * 5 + 20  # offset: cancellation must not bite
    sums = GaussianSums(3, 4, torch.device("cpu"))
    for batch in features.split(3):
        sums.add(batch)
    means, covariances = sums.select(torch.tensor([0, 2])).gaussians()
    rows = features[:, [0, 2]].flatten(2).permute(2, 0, 1).double()  # (P, N, C)
    torch.testing.assert_close(means, rows.mean(dim=1))
    expected = torch.stack([torch.cov(position.T) for position in rows])
    torch.testing.assert_close(covariances, expected, rtol=1e-5, atol=1e-4)


# -- min-over-neighbours Mahalanobis ---------------------------------------------------------------------------


def test_min_neighbour_mahalanobis_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(4)
    views, channels, height, width, radius = 3, 5, 4, 6, 1
    features = torch.randn(views, channels, height, width, generator=generator)
    means = torch.randn(height * width, channels, generator=generator)
    roots = torch.randn(height * width, channels, channels, generator=generator)
    whitening = whitening_matrices((roots @ roots.transpose(1, 2) + torch.eye(channels)).double()).float()
    got = min_neighbour_mahalanobis(features, means, whitening, radius)
    expected = torch.full((views, height, width), math.inf)
    for v, i, j in itertools.product(range(views), range(height), range(width)):
        for dy, dx in neighbour_offsets(radius):
            qi, qj = i + dy, j + dx
            if 0 <= qi < height and 0 <= qj < width:
                q = qi * width + qj
                distance = torch.linalg.vector_norm(whitening[q] @ (features[v, :, i, j] - means[q]))
                expected[v, i, j] = min(expected[v, i, j], distance)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_min_over_neighbours_absorbs_a_one_cell_shift_of_a_good_pattern() -> None:
    """Gaussians fitted on noisy copies of a pattern; the pattern shifted by one cell looks anomalous to each
    position's own Gaussian but normal to its neighbour's."""
    generator = torch.Generator().manual_seed(5)
    channels, size = 6, 10
    pattern = torch.randn(1, channels, size, size, generator=generator) * 3
    sums = GaussianSums(channels, size * size, torch.device("cpu"))
    for _ in range(40):
        sums.add(pattern + 0.3 * torch.randn(4, channels, size, size, generator=generator))
    settings = NpadSettings(channels=channels, train_radius=0)
    gaussians = gaussians_from_sums(sums, settings, (size, size), neighbours=True)
    shifted = torch.roll(pattern, shifts=1, dims=3)  # one cell to the right; column 0 wraps around
    own = gaussians.distances(shifted, radius=0)[..., 1:]
    nearest = gaussians.distances(shifted, radius=1)[..., 1:]
    unshifted = gaussians.distances(pattern, radius=0)
    assert nearest.mean() < 0.2 * own.mean()  # the neighbour's distribution explains the shifted pattern
    assert nearest.mean() < 2 * unshifted.mean()  # ... about as well as the own one explains the unshifted


# -- artifact --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npad_model(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> tuple[Scorer, Path]:
    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "npad"}, "npad": FAST_NPAD})
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.2)
    model_dir = tmp_path_factory.mktemp("npad-model")
    scorer.save(model_dir)
    return scorer, model_dir


def test_saved_files_have_the_recorded_shapes(npad_model: tuple[Scorer, Path]) -> None:
    scorer, model_dir = npad_model
    manifest = json.loads((model_dir / "manifest.json").read_text())
    section = manifest["method"]
    positions = section["features"]["grid"][0] * section["features"]["grid"][1]
    whitening = np.load(model_dir / npad.PIXEL_WHITENING_FILE, allow_pickle=False)
    assert whitening.shape == (positions, 48, 48) and whitening.dtype == np.float32
    assert np.allclose(np.triu(whitening, 1), 0)  # lower triangular
    assert np.load(model_dir / npad.CENTROIDS_FILE).shape == (section["centroids"], 48)
    assert "npad" in manifest["method"]["name"] and scorer.method.describe().endswith("centroids")


def test_a_different_image_size_is_refused_at_load(npad_model: tuple[Scorer, Path], tmp_path: Path) -> None:
    _, model_dir = npad_model
    manifest = json.loads((model_dir / "manifest.json").read_text())
    from models.artifact import _write_manifest

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest["model"]["image_size"] = 128
    _write_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match="grid"):
        load_scorer(copy, device="cpu")


def test_float16_whitening_changes_scores_little(
    npad_model: tuple[Scorer, Path], demo_line: DemoLine, tmp_path: Path
) -> None:
    scorer, _ = npad_model
    method = scorer.method
    assert isinstance(method, npad.NpadMethod)
    method.settings = method.settings.model_copy(update={"whitening_dtype": "float16"})
    try:
        scorer.save(tmp_path / "half")
    finally:
        method.settings = method.settings.model_copy(update={"whitening_dtype": "float32"})
    half = load_scorer(tmp_path / "half", device="cpu")
    images = [read_image(path) for path in demo_line.test_images[:4]]
    np.testing.assert_allclose(half.score(images).scores, scorer.score(images).scores, rtol=1e-2)
    assert np.load(tmp_path / "half" / npad.PIXEL_WHITENING_FILE).dtype == np.float16


def test_mahalanobis_score_skips_the_centroids_and_reloads(demo_line: DemoLine, tmp_path: Path) -> None:
    settings = FAST_NPAD | {"score": "mahalanobis"}
    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "npad"}, "npad": settings})
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.0)
    scorer.save(tmp_path / "model")
    assert not (tmp_path / "model" / npad.CENTROIDS_FILE).exists()
    images = [read_image(path) for path in demo_line.test_images[:3]]
    batch = scorer.score(images)
    np.testing.assert_array_equal(load_scorer(tmp_path / "model", device="cpu").score(images).scores, batch.scores)
    assert "no centroids" in scorer.method.describe()


def test_branch_two_averages_over_its_own_kernel_whatever_the_model_aggregation(demo_line: DemoLine) -> None:
    paths = sorted(demo_line.train_dir.iterdir())
    images = [read_image(path) for path in demo_line.test_images[:3]]

    def scores(model_kernel: int, averaging_kernel: int) -> np.ndarray:
        config = config_from_mapping(TINY | {
            "model": {"image_size": 96, "method": "npad", "aggregation_kernel": model_kernel},
            "npad": FAST_NPAD | {"averaging_kernel": averaging_kernel},
            "scoring": TINY["scoring"] | {"normalise_positions": False},
        })  # fmt: skip
        return fit_scorer(paths, config, progress=False, holdout_fraction=0.0).score(images).scores

    reference = scores(model_kernel=3, averaging_kernel=3)
    np.testing.assert_array_equal(scores(model_kernel=1, averaging_kernel=3), reference)
    assert not np.allclose(scores(model_kernel=3, averaging_kernel=1), reference)
