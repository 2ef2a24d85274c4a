import numpy as np
import pytest

from models.threshold import best_f1_threshold, false_reject_threshold, threshold_reliability


def test_false_reject_rate_is_met_on_the_good_scores() -> None:
    scores = np.random.default_rng(0).normal(10, 1, size=1000)
    threshold = false_reject_threshold(scores, 0.01)
    assert (scores > threshold.value).sum() == 10
    assert threshold.good_images == 1000 and threshold.method == "false_reject_rate"


def test_works_with_good_images_only_and_never_flags_everything() -> None:
    scores = np.array([3.0, 3.2, 3.1, 2.9, 3.3])
    with pytest.warns(UserWarning, match="cannot resolve"):
        threshold = false_reject_threshold(scores, 0.005)
    assert threshold.value > scores.max()


def test_invalid_calibration_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 good images, got 0"):
        false_reject_threshold(np.array([]), 0.01)
    with pytest.raises(ValueError, match="false_reject_rate"):
        false_reject_threshold(np.array([1.0]), 1.5)


def test_one_good_score_sets_no_threshold() -> None:
    # its threshold would be that score: about half of all good parts fail it
    with pytest.raises(ValueError, match="a threshold needs at least 2 good images, got 1"):
        false_reject_threshold(np.array([3.0]), 0.005)


def test_fewer_than_20_good_images_are_called_unreliable_and_more_are_not() -> None:
    with pytest.warns(UserWarning, match="From fewer than 20 good images such a threshold is unreliable"):
        false_reject_threshold(np.arange(19.0), 0.005)
    with pytest.warns(UserWarning) as caught:
        false_reject_threshold(np.arange(20.0), 0.005)
    assert len(caught) == 1 and "cannot resolve" in str(caught[0].message)
    assert "unreliable" not in str(caught[0].message)


def test_a_threshold_from_few_images_says_what_such_thresholds_rejected_and_what_to_do() -> None:
    three = threshold_reliability(3, 0.005)
    assert "rejected 12.9% of other good parts when set from 3 good images (benchmarks" in three
    assert three.endswith("calibrate on at least 20, better 200, good images the model has not seen.")
    # between two measured counts: both, the one below first
    assert "rejected 6.6% of other good parts when set from 5 good images and 2.1% from 10" in threshold_reliability(
        7, 0.005
    )
    # a rate 20 images can measure still asks for 20: fewer are unreliable whatever the rate
    assert threshold_reliability(5, 0.1).endswith("calibrate on at least 20 good images the model has not seen.")
    fifty = threshold_reliability(50, 0.005)
    assert "unreliable" not in fifty and "calibrate on 200 or more" in fifty
    assert threshold_reliability(200, 0.005) == "" and threshold_reliability(20, 0.05) == ""


def test_best_f1_separates_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    value, f1 = best_f1_threshold(labels, scores)
    assert 0.3 < value < 0.8 and f1 == 1.0
    with pytest.raises(ValueError, match="defective"):
        best_f1_threshold(np.zeros(3), scores[:3])


@pytest.mark.parametrize(("rate", "images"), [(0.009, 3000), (0.018, 1500), (0.036, 750), (0.29, 100)])
def test_the_rate_allows_as_many_rejects_as_it_says_where_binary_floats_fall_short(rate: float, images: int) -> None:
    from fractions import Fraction

    allowed = int(Fraction(str(rate)) * images)  # exact: 27, 27, 27, 29
    scores = np.arange(images, dtype=np.float64)
    assert (scores > false_reject_threshold(scores, rate).value).sum() == allowed


def test_ties_at_the_threshold_never_reject_more_than_the_rate() -> None:
    scores = np.array([1.0] * 6 + [2.0] * 4)
    threshold = false_reject_threshold(scores, 0.2)  # 2 rejects allowed, but 4 share the top score
    assert threshold.value == 2.0 and (scores > threshold.value).sum() == 0  # any lower threshold rejects 4


def test_the_threshold_is_the_lowest_good_score_rejecting_at_most_the_rate_by_brute_force() -> None:
    """Against a plain search: among the good scores as candidates (fail = above), the lowest whose rejects are at
    most floor(rate x n), counted exactly with fractions; with ties, at exactly the rate and below it."""
    from fractions import Fraction

    rng = np.random.default_rng(6)
    for _ in range(200):
        count = int(rng.integers(2, 400))
        rate = float(rng.choice([0.005, 0.01, 0.02, 0.05, 0.1, 0.25]))
        scores = np.round(rng.normal(5, 1, count), int(rng.integers(0, 3)))  # 0-2 decimals: many ties
        allowed = int(Fraction(str(rate)) * count)
        if allowed == 0:
            continue  # the margin branch, tested above
        expected = min(s for s in scores if (scores > s).sum() <= allowed)
        assert false_reject_threshold(scores, rate).value == expected


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_good_scores_set_no_threshold(bad: float) -> None:
    # np.sort puts NaN last: with more NaN than allowed rejects the threshold was NaN, and score > NaN passes every
    # part; an infinite good score made an infinite threshold (with the margin) that nothing can exceed
    scores = np.r_[np.random.default_rng(0).normal(10, 1, 300), [bad] * 3]
    with pytest.raises(ValueError, match="3 of 303 good scores are not finite"):
        false_reject_threshold(scores, 0.005)
    with pytest.raises(ValueError, match="3 of 12 good scores are not finite"):  # the few-images branch too
        false_reject_threshold(scores[-12:], 0.005)


def test_best_f1_threshold_separates_adjacent_floats() -> None:
    # the midpoint of two adjacent doubles rounds onto one of them: "fail = score > midpoint" then left the best
    # defect passing while the reported F1 counted it caught
    labels = np.array([1, 0, 0])
    scores = np.array([1.0, np.nextafter(1.0, 0.0), 0.5])
    value, f1 = best_f1_threshold(labels, scores)
    assert f1 == 1.0 and ((scores > value) == labels.astype(bool)).all()


def test_best_f1_threshold_refuses_nan_scores() -> None:
    with pytest.raises(ValueError, match="1 NaN among 3"):
        best_f1_threshold(np.array([1, 0, 0]), np.array([0.9, np.nan, 0.1]))
