import torch

from models.backbones import load_backbone
from models.pixel_statistics import GRADIENT_GAIN, CellStatistics


def test_cell_statistics_see_brightness_contrast_and_edges_where_they_are() -> None:
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :8, :8] = 2.0  # a bright, flat cell
    image[:, :, 16:, 16:] = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(4)  # vertical stripes, two pixels wide
    stats = CellStatistics(8)(image)[0]  # (7, 4, 4)
    mean, deviation, gradient = stats[:3], stats[3:6], stats[6]
    assert torch.allclose(mean[:, 0, 0], torch.full((3,), 2.0)) and float(mean[:, 1, 1].abs().max()) == 0.0
    assert float(deviation[:, 0, 0].max()) == 0.0 and float(deviation[:, 3, 3].min()) > 1.0
    assert float(gradient[3, 3]) > 0.5 * GRADIENT_GAIN and float(gradient[2, 0]) == 0.0
    assert float(gradient[0, 0]) > 0.0 and float(gradient[0, 3]) == 0.0  # the bright cell's border, not far away


def test_pixel_statistics_backbone_taps_three_cell_sizes() -> None:
    backbone = load_backbone("pixel_statistics")
    with torch.inference_mode():
        maps = backbone(torch.rand(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 7, 8, 8), (2, 7, 4, 4), (2, 7, 2, 2)]
