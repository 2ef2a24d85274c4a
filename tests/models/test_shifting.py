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
