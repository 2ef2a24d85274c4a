import numpy as np
import pytest

from models.threshold import best_f1_threshold, false_reject_threshold


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
    with pytest.raises(ValueError, match="at least one good"):
        false_reject_threshold(np.array([]), 0.01)
    with pytest.raises(ValueError, match="false_reject_rate"):
        false_reject_threshold(np.array([1.0]), 1.5)


def test_best_f1_separates_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    value, f1 = best_f1_threshold(labels, scores)
    assert 0.3 < value < 0.8 and f1 == 1.0
    with pytest.raises(ValueError, match="defective"):
        best_f1_threshold(np.zeros(3), scores[:3])
