"""Independent checks that methods do what their papers say, where the existing tests stop short.

- PatchCore's greedy k-center coreset with its random projection (``models.memory_bank.coreset_select``): the
  farthest-point selection, step by step, in the projected space (the unprojected path has its own brute-force test
  in ``test_memory_bank.py``), and a projection that keeps distances (Johnson-Lindenstrauss), so the cover it gives
  is a cover of the real features.
- N-pad shifting through the Scorer (``models.scorer`` + ``models.shifting``): a view's map moved back by the wrong
  sign puts a defect's heat ``2 x shift`` pixels off; here it must land where the defect is.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from models.memory_bank import coreset_select
from models.methods.base import AnomalyMethod, MethodOutput
from models.scorer import Scorer, TrainingSummary
from pipeline.config import config_from_mapping


def test_projected_coreset_is_the_greedy_farthest_point_selection_in_the_projected_space() -> None:
    rng = np.random.default_rng(0)
    points = (rng.normal(size=(2000, 256)) * rng.uniform(0.2, 2.0, 256)).astype(np.float32)
    selected = coreset_select(points, 0.02, projection_dim=32, seed=5)
    generator = torch.Generator().manual_seed(5)  # the same draws: the projection, then the first centre
    projection = (torch.randn(256, 32, generator=generator) / math.sqrt(32)).numpy().astype(np.float64)
    first = int(torch.randint(2000, (1,), generator=generator))
    projected = points.astype(np.float64) @ projection
    chosen = [first]
    distance = ((projected - projected[first]) ** 2).sum(axis=1)
    for _ in range(len(selected) - 1):
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, ((projected - projected[chosen[-1]]) ** 2).sum(axis=1))
    assert selected.tolist() == chosen
    # the projection keeps pairwise distances within ~30%, so the projected cover covers the features
    pairs = rng.integers(0, 2000, (500, 2))
    true = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    kept = np.linalg.norm(projected[pairs[:, 0]] - projected[pairs[:, 1]], axis=1)
    ratio = kept[true > 0] / true[true > 0]
    assert 0.85 < float(np.median(ratio)) < 1.15 and float(np.percentile(ratio, 95)) < 1.4


class _BrightnessMethod:
    """A stand-in method: each view's patch map is its mean brightness per 8x8 cell (stride 8, like the default
    grid), so a bright defect's heat sits exactly where the view shows the defect."""

    name = "brightness"

    def score_views(self, views: torch.Tensor, scoring: object) -> MethodOutput:
        maps = F.avg_pool2d(views.mean(dim=1, keepdim=True), 8)[:, 0]
        return MethodOutput(maps, None, 0.0, 0.0)


def test_shifted_views_put_a_defects_heat_back_on_the_defect() -> None:
    config = config_from_mapping({"model": {"image_size": 64, "intensity": "raw", "registration": "off"},
                                  "scoring": {"shift_pixels": 8, "shift_aggregate": "mean", "smoothing_sigma": 0,
                                              "normalise_positions": False, "image_score": "max"}})  # fmt: skip
    method = cast(AnomalyMethod, _BrightnessMethod())
    scorer = Scorer(method, config.model, config.scoring, TrainingSummary(images=0))
    frame = np.zeros((64, 64), np.uint8)
    frame[24:32, 40:48] = 255  # one 8x8 cell of the grid: row 3, column 5
    shifted = scorer.score([frame]).maps[0]
    unshifted = scorer.with_scoring(config.scoring.model_copy(update={"shift_pixels": 0})).score([frame]).maps[0]
    rows, columns = np.mgrid[:64, :64]
    for heat in (shifted, unshifted):
        weights = heat.astype(np.float64)
        centre = ((weights * rows).sum() / weights.sum(), (weights * columns).sum() / weights.sum())
        assert abs(centre[0] - 27.5) < 1.0 and abs(centre[1] - 43.5) < 1.0  # the defect's centre
    assert np.unravel_index(int(shifted.argmax()), shifted.shape)[0] in range(24, 32)
