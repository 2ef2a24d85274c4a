"""Gaussian AD's own ideas: streaming Ledoit-Wolf equal to the textbook formula and closer to the truth than the
sample covariance, negated PCA keeping the least-variance directions, Mahalanobis distances, deviations along a
rare direction scoring higher than along a common one, and bounded per-position Gaussians that must match the
backbone they were fitted on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.artifact import load_scorer, read_manifest
from models.errors import ArtifactError
from models.fit import fit_scorer
from models.methods.gaussian import GaussianMethod, _image_gaussians
from models.methods.gaussian_stats import GaussianMoments, least_variance_components, mahalanobis, precision_matrix
from models.synthetic import DemoLine
from pipeline.config import GaussianSettings, ModelSettings, config_from_mapping
from tests.models.conftest import TINY


def _textbook_ledoit_wolf(samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit & Wolf (2004) on ``(n, d)`` samples, written directly from the paper's definitions."""
    n, d = samples.shape
    centred = samples - samples.mean(dim=0)
    sample = centred.T @ centred / n
    mu = sample.trace() / d
    identity = torch.eye(d, dtype=samples.dtype)
    distance = ((sample - mu * identity) ** 2).sum()
    spread = sum(((torch.outer(row, row) - sample) ** 2).sum() for row in centred) / n**2
    shrinkage = float(min(spread, distance) / distance)
    return (1 - shrinkage) * sample + shrinkage * mu * identity, shrinkage


def test_streaming_ledoit_wolf_equals_the_textbook_estimator_far_from_the_origin() -> None:
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(40, 3, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 6) + 1e4
    moments = GaussianMoments(3, 6, shift=samples[:4].mean(dim=0), fourth_moments=True)
    for chunk in samples.split(7):  # uneven batches
        moments.add(chunk)
    shrunk = moments.ledoit_wolf()
    for position in range(3):
        expected, shrinkage = _textbook_ledoit_wolf(samples[:, position])
        torch.testing.assert_close(shrunk.covariance[position], expected, rtol=1e-8, atol=1e-10)
        assert float(shrunk.shrinkage[position]) == pytest.approx(shrinkage, rel=1e-8)
        torch.testing.assert_close(moments.covariance(unbiased=True)[position], torch.cov(samples[:, position].T))
    torch.testing.assert_close(moments.mean(), samples.mean(dim=0))


def test_ledoit_wolf_beats_the_sample_covariance_with_fewer_samples_than_dimensions() -> None:
    generator = torch.Generator().manual_seed(1)
    dim = 30
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    truth = basis @ torch.diag(torch.linspace(0.5, 2.0, dim, dtype=torch.float64)) @ basis.T
    samples = torch.randn(20, dim, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(truth).T
    moments = GaussianMoments(1, dim, fourth_moments=True)
    moments.add(samples[:, None])
    shrunk = moments.ledoit_wolf()
    sample_error = torch.linalg.matrix_norm(moments.covariance(unbiased=False)[0] - truth)
    shrunk_error = torch.linalg.matrix_norm(shrunk.covariance[0] - truth)
    assert 0 < float(shrunk.shrinkage[0]) < 1
    assert float(shrunk_error) < 0.5 * float(sample_error)
    precision_matrix(shrunk.covariance)  # invertible although the sample covariance (rank 19) is not
    with pytest.raises(ValueError, match="singular"):
        precision_matrix(moments.covariance(unbiased=False))


def test_negated_pca_keeps_the_fewest_smallest_components_holding_the_share() -> None:
    generator = torch.Generator().manual_seed(2)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    variances = torch.tensor([88.0, 6.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # last: a null direction
    covariance = rotation @ torch.diag(variances) @ rotation.T
    components = least_variance_components(covariance, retained_variance=0.05)
    # smallest first: 1 (1%), 1 + 2 (3%), 1 + 2 + 3 (6% >= 5%) -> the directions of 3, 2 and 1; never the null one
    assert components.shape == (6, 3)
    torch.testing.assert_close(components.T @ components, torch.eye(3, dtype=torch.float64))
    kept_variances = torch.diag(components.T @ covariance @ components)
    torch.testing.assert_close(kept_variances, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    capped = least_variance_components(covariance, retained_variance=0.05, max_components=2)
    torch.testing.assert_close(
        torch.diag(capped.T @ covariance @ capped), torch.tensor([2.0, 1.0], dtype=torch.float64)
    )
    assert least_variance_components(covariance, retained_variance=1.0).shape == (6, 5)
    with pytest.raises(ValueError):
        least_variance_components(covariance, retained_variance=0.0)


def test_mahalanobis_matches_its_definition_per_position() -> None:
    generator = torch.Generator().manual_seed(3)
    samples, mean = torch.randn(5, 4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    factors = torch.randn(4, 3, 3, generator=generator)
    precision = factors @ factors.transpose(1, 2) + torch.eye(3)
    distances = mahalanobis(samples, mean, precision)
    assert distances.shape == (5, 4)
    for view in range(5):
        for position in range(4):
            difference = samples[view, position] - mean[position]
            expected = torch.sqrt(difference @ precision[position] @ difference)
            assert float(distances[view, position]) == pytest.approx(float(expected), rel=1e-5)


def test_a_deviation_along_a_rare_direction_scores_higher_than_along_a_common_one() -> None:
    generator = torch.Generator().manual_seed(4)
    spreads = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.3, 0.1])
    pooled = torch.randn(400, 6, generator=generator) * spreads + 3.0
    gaussians = _image_gaussians(pooled, GaussianSettings(retained_variance=0.05))
    # variances 100, 25, 4, 1, 0.09, 0.01: the four smallest hold 3.9% < 5%, so the five smallest are kept
    assert gaussians.components == 5
    centre = pooled.mean(dim=0)
    common, rare = centre.clone(), centre.clone()
    common[0] += 2.0  # 0.2 standard deviations of the commonest direction
    rare[5] += 2.0  # 20 standard deviations of the rarest
    distances = gaussians.distances(torch.stack([centre, common, rare])[:, None])[:, 0]
    assert float(distances[0]) < 0.5 and float(distances[1]) < 0.5  # the commonest direction is projected out
    assert float(distances[2]) > 5.0  # (less than 20: Ledoit-Wolf shrinks the variances towards their mean)


@pytest.fixture(scope="module")
def saved_gaussian(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = {section: dict(values) for section, values in TINY.items()}
    settings["model"]["method"] = "gaussian"
    settings["gaussian"] = {"init_images": 4, "position_max_components": 3}
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config_from_mapping(settings), progress=False,
                        holdout_fraction=0.2)  # fmt: skip
    model_dir = tmp_path_factory.mktemp("gaussian")
    scorer.save(model_dir)
    return model_dir


def test_per_position_gaussians_are_capped_and_the_map_has_the_finest_grid(saved_gaussian: Path) -> None:
    method = load_scorer(saved_gaussian, device="cpu").method
    assert isinstance(method, GaussianMethod)
    assert len(method.position_gaussians) == 6 and all(g.components <= 3 for g in method.position_gaussians)
    assert [g.positions for g in method.position_gaussians] == [24 * 24, 12 * 12, 6 * 6, 6 * 6, 3 * 3, 3 * 3]
    output = method.score_views(torch.rand(2, 3, 96, 96), load_scorer(saved_gaussian, device="cpu").scoring)
    assert output.patch_maps.shape == (2, 24, 24) and output.view_scores is not None
    assert output.view_scores.shape == (2,) and bool((output.view_scores > 0).all())


def test_a_model_loaded_at_another_image_size_is_refused(saved_gaussian: Path) -> None:
    manifest = read_manifest(saved_gaussian)
    section = {key: value for key, value in manifest["method"].items() if key != "name"}
    model = ModelSettings.model_validate(manifest["model"] | {"image_size": 128, "device": "cpu"})
    with pytest.raises(ArtifactError, match="image size mismatch"):
        GaussianMethod.load(saved_gaussian, section, model, torch.device("cpu"))


def test_one_image_is_refused_with_a_clear_message() -> None:
    class _OneImage:
        images = 1

        def __iter__(self) -> Iterator[torch.Tensor]:
            return iter([torch.rand(1, 3, 64, 64)])

    config = config_from_mapping({"model": {"method": "gaussian", "image_size": 64}})
    with pytest.raises(ValueError, match="at least 2 good images"):
        GaussianMethod.fit(_OneImage(), config, torch.device("cpu"), progress=False)
