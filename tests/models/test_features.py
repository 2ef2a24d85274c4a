import pytest
import torch

from models.backbones import load_backbone
from models.features import PatchFeatureExtractor, flatten_patches


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("efficientnet_lite0")


def test_two_levels_concatenated_on_the_stride_8_grid(backbone) -> None:
    extractor = PatchFeatureExtractor(backbone)
    with torch.inference_mode():
        features = extractor(torch.rand(3, 3, 96, 96))
    assert features.shape == (3, 152, 12, 12)
    assert extractor.output_shape(96) == (152, 12, 12)


def test_feature_dim_reduces_channels(backbone) -> None:
    with torch.inference_mode():
        features = PatchFeatureExtractor(backbone, feature_dim=64)(torch.rand(1, 3, 64, 64))
    assert features.shape == (1, 64, 8, 8)


def test_local_aggregation_smooths_features(backbone) -> None:
    image = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        sharp = PatchFeatureExtractor(backbone, aggregation_kernel=1)(image)
        smooth = PatchFeatureExtractor(backbone, aggregation_kernel=3)(image)
    assert smooth.diff(dim=-1).abs().mean() < sharp.diff(dim=-1).abs().mean()


def test_even_kernel_rejected(backbone) -> None:
    with pytest.raises(ValueError, match="odd"):
        PatchFeatureExtractor(backbone, aggregation_kernel=2)


def test_flatten_is_row_major_over_batch_and_grid() -> None:
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    flat = flatten_patches(features)
    assert flat.shape == (8, 3)
    assert torch.equal(flat[5], features[1, :, 0, 1])
