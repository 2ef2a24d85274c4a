import numpy as np
import pytest
import torch

from models.scorer import Scorer
from models.shifting import align_and_aggregate, shift_offsets, shifted_views, translate
from models.synthetic import make_part


def test_offsets() -> None:
    assert shift_offsets(0) == [(0, 0)]
    assert shift_offsets(3, "cross") == [(0, 0), (3, 0), (-3, 0), (0, 3), (0, -3)]
    assert len(shift_offsets(2, "grid")) == 9
    with pytest.raises(ValueError):
        shift_offsets(-1)


def test_translate_moves_content_right_and_down() -> None:
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 3] = 1.0
    moved = translate(image, dx=2, dy=1)
    assert moved[0, 0, 3, 5] == 1.0 and moved.sum() == 1.0


def test_views_align_back_to_original_coordinates() -> None:
    maps = torch.rand(2, 1, 16, 16)
    offsets = shift_offsets(2, "grid")
    views = shifted_views(maps, offsets)  # a "map" computed on each view is the view itself
    assert views.shape == (2 * 9, 1, 16, 16)
    aligned = align_and_aggregate(views[:, 0], offsets, "mean")
    interior = (slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(aligned[interior], maps[:, 0][interior])


def test_shifting_lowers_scores_of_misaligned_good_parts(fitted_scorer: Scorer) -> None:
    import skimage.data

    rng = np.random.default_rng(5)
    parts = [make_part(skimage.data.brick(), rng, 160, max_shift=12, max_rotation=1) for _ in range(4)]
    plain = fitted_scorer.score(parts).scores
    shifted = fitted_scorer.with_scoring(fitted_scorer.scoring.model_copy(update={"shift_pixels": 4})).score(parts)
    assert (shifted.scores <= plain + 1e-5).all()
    assert shifted.scores.mean() < plain.mean()
