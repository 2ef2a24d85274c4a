import numpy as np
import pytest

from models.evaluation import auroc, f1_max, pro_auc, roc_curve


def _mann_whitney(labels: np.ndarray, scores: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None]).sum() + 0.5 * (positives[:, None] == negatives[None]).sum()
    return float(wins / (positives.size * negatives.size))


def test_auroc_equals_the_pairwise_probability_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding creates ties
    assert auroc(labels, scores) == pytest.approx(_mann_whitney(labels, scores), abs=1e-12)


def test_roc_endpoints_and_single_class_error() -> None:
    fpr, tpr = roc_curve(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.3, 0.2]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="both classes"):
        roc_curve(np.zeros(3), np.arange(3))


def test_pro_is_one_for_a_perfect_map_and_low_for_an_inverted_one() -> None:
    masks = np.zeros((3, 32, 32), bool)
    masks[0, 4:10, 4:10] = True
    masks[1, 20:30, 2:5] = True
    perfect = masks.astype(np.float32) + np.random.default_rng(0).uniform(0, 0.1, masks.shape)
    assert pro_auc(masks, perfect) == pytest.approx(1.0, abs=0.01)
    assert pro_auc(masks, -perfect) < 0.05


def test_pro_averages_regions_not_pixels() -> None:
    masks = np.zeros((1, 64, 64), bool)
    masks[0, :32, :32] = True  # a large region, found
    masks[0, 50:52, 50:52] = True  # a small region, missed
    maps = np.zeros((1, 64, 64), np.float32)
    maps[0, :32, :32] = 1.0
    assert pro_auc(masks, maps) == pytest.approx(0.5, abs=0.02)


def test_f1_max() -> None:
    assert f1_max(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.7])) == 1.0
