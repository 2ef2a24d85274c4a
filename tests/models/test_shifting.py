from typing import Literal

import numpy as np
import pytest
import torch

from models.scorer import Scorer
from models.shifting import align_and_aggregate, shift_offsets, shifted_views, translate
from models.synthetic import make_part

Aggregate = Literal["min", "mean"]
Pattern = Literal["cross", "grid"]


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


def test_only_frames_failing_unshifted_are_shifted_and_the_verdicts_are_those_of_shifting_all(
    fitted_scorer: Scorer,
) -> None:
    import skimage.data

    from models.scorer import Threshold

    rng = np.random.default_rng(7)
    parts = [make_part(skimage.data.brick(), rng, 160, max_shift=12, max_rotation=1) for _ in range(8)]
    plain = fitted_scorer.score(parts)
    threshold = float(np.median(plain.scores))  # half the frames fail unshifted
    scoring = fitted_scorer.scoring.model_copy(update={"shift_pixels": 4})
    shifting = Scorer(fitted_scorer.method, fitted_scorer.model_settings, scoring, fitted_scorer.training,
                      Threshold(threshold, "manual"), position_stats=fitted_scorer.position_stats,
                      companions=fitted_scorer.companions, registration=fitted_scorer.registration)  # fmt: skip
    views_seen: list[int] = []
    score_views = shifting.method.score_views

    def counting(views: torch.Tensor, settings: object) -> object:
        views_seen.append(int(views.shape[0]))
        return score_views(views, settings)  # type: ignore[arg-type]

    shifting.method.score_views = counting  # type: ignore[method-assign,assignment]
    try:
        cascaded = shifting.score(parts)
        calls_cascaded = list(views_seen)
        every = shifting.score(parts, shift_every_frame=True)
    finally:
        del shifting.method.score_views  # the fixture's method is shared: back to the class's
    failing = plain.scores > threshold
    assert 0 < failing.sum() < len(parts)
    assert calls_cascaded == [len(parts), 5 * int(failing.sum())]  # all unshifted, then 5 views of failing ones
    assert (cascaded.shifted == failing).all() and every.shifted.all() and not plain.shifted.any()
    assert ((cascaded.scores > threshold) == (every.scores > threshold)).all()
    np.testing.assert_allclose(cascaded.scores[failing], every.scores[failing], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cascaded.maps[failing], every.maps[failing], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cascaded.scores[~failing], plain.scores[~failing], rtol=1e-5, atol=1e-5)
    assert (every.scores[~failing] < plain.scores[~failing] - 1e-4).any()  # shifting them would have changed them
    assert (every.scores <= plain.scores + 1e-5).all()  # why skipping passing frames keeps verdicts
    without = shifting.with_scoring(scoring.model_copy(update={"shift_only_failing": False})).score(parts)
    np.testing.assert_allclose(without.scores, every.scores, rtol=1e-5, atol=1e-5)


def _seen_by_brute_force(maps: torch.Tensor, offsets: list[tuple[int, int]], how: Aggregate) -> torch.Tensor:
    """Per pixel (y, x) of the original image, over the views whose content holds it (a view shifted by (dx, dy)
    shows pixel (y, x) at (y + dy, x + dx) when that lies in the frame): the min or mean of those views' maps there."""
    views = len(offsets)
    grouped = maps.reshape(-1, views, *maps.shape[-2:])
    height, width = maps.shape[-2:]
    out = torch.empty(grouped.shape[0], height, width, dtype=maps.dtype)
    for image in range(grouped.shape[0]):
        for y in range(height):
            for x in range(width):
                values = [float(grouped[image, v, y + dy, x + dx]) for v, (dx, dy) in enumerate(offsets)
                          if 0 <= y + dy < height and 0 <= x + dx < width]  # fmt: skip
                out[image, y, x] = min(values) if how == "min" else sum(values) / len(values)
    return out


@pytest.mark.parametrize("pattern", ["cross", "grid"])
@pytest.mark.parametrize("how", ["min", "mean"])
def test_each_pixel_aggregates_only_the_views_that_saw_it(pattern: Pattern, how: Aggregate) -> None:
    """A view shifted by +d lost the pixels within d of one border; its aligned-back map there was its edge
    replicated, a value from d pixels inside. With the minimum that hid a defect on the border strip."""
    offsets = shift_offsets(3, pattern)
    maps = torch.rand(2 * len(offsets), 10, 9, generator=torch.Generator().manual_seed(0))
    expected = _seen_by_brute_force(maps, offsets, how)
    torch.testing.assert_close(align_and_aggregate(maps, offsets, how), expected)


def test_a_defect_on_the_border_strip_survives_the_minimum() -> None:
    """Maps that are their views (an ideal scorer): shifting and aligning back gives every pixel its own value,
    borders included; the spike in the last column used to be replaced by the +2 px view's 0."""
    image = torch.zeros(1, 1, 12, 12)
    image[0, 0, 5, 11] = image[0, 0, 0, 0] = 5.0
    offsets = shift_offsets(2, "grid")
    views = shifted_views(image, offsets)[:, 0]
    torch.testing.assert_close(align_and_aggregate(views, offsets, "min"), image[:, 0])
    torch.testing.assert_close(align_and_aggregate(views, offsets, "mean"), image[:, 0])


def test_view_scores_aggregate_over_every_view() -> None:
    from models.shifting import aggregate_view_scores

    offsets = shift_offsets(2, "cross")
    scores = torch.tensor([5.0, 3.0, 4.0, 6.0, 7.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(aggregate_view_scores(scores, offsets, "min"), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(aggregate_view_scores(scores, offsets, "mean"), torch.tensor([5.0, 1.8]))
