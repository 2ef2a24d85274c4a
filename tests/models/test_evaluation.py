import json
import logging
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models import datasets  # a module import: pytest would collect `test_items` as a test
from models.evaluation import auroc, f1_max, pro_auc, roc_curve
from models.report import evaluate, score_items
from models.scorer import Scorer
from models.synthetic import DemoLine


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


# evaluate's report (models.report) on a copy of the demo line, scored one image at a time so that a test set with
# fewer images gives the same maps for the others


def _copy_demo(demo_line: DemoLine, destination: Path) -> Path:
    shutil.copytree(demo_line.root, destination, ignore=shutil.ignore_patterns("train"))
    return destination


def _evaluate(scorer: Scorer, data: Path, out_dir: Path) -> dict[str, Any]:
    return evaluate(scorer, datasets.test_items(data), out_dir, batch_size=1, progress=False)


def test_a_defective_image_without_mask_counts_for_image_metrics_only(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = _evaluate(fitted_scorer, demo_line.root, tmp_path / "full_report")
    data = _copy_demo(demo_line, tmp_path / "data")
    (data / "ground_truth" / "defect" / "defect_0000_mask.png").unlink()
    without_image = _copy_demo(demo_line, tmp_path / "without_image")
    (without_image / "test" / "defect" / "defect_0000.png").unlink()
    (without_image / "ground_truth" / "defect" / "defect_0000_mask.png").unlink()
    with caplog.at_level(logging.WARNING, logger="models.report"):
        metrics = _evaluate(fitted_scorer, data, tmp_path / "report")
    assert "1 defective images have no mask" in caplog.text and "defect_0000.png" in caplog.text
    assert metrics["defective_without_mask"] == 1 and full["defective_without_mask"] == 0
    assert (metrics["images"], metrics["defective_images"]) == (12, 6)
    assert metrics["image_auroc"] == full["image_auroc"] and metrics["f1_max"] == full["f1_max"]
    # pixel metrics as if the image were not in the test set, not as if its defect were good pixels
    reference = _evaluate(fitted_scorer, without_image, tmp_path / "reference_report")
    for key in ("pixel_auroc", "pro"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-9) and metrics[key] != full[key]
    assert metrics["pixel_auroc_by_type"] == pytest.approx(reference["pixel_auroc_by_type"], abs=1e-9)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["defective_without_mask"] == 1


def test_an_empty_mask_is_a_real_mask(fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path) -> None:
    """As MTD's four empty Uneven masks: present and all zero, their pixels count as good ones."""
    data = _copy_demo(demo_line, tmp_path / "data")
    mask = data / "ground_truth" / "defect" / "defect_0000_mask.png"
    cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)))
    scored = score_items(fitted_scorer, datasets.test_items(data), 4, progress=False)
    assert scored.mask_known.all() and not scored.masks[len(scored.items) - 6].any()
    assert _evaluate(fitted_scorer, data, tmp_path / "report")["defective_without_mask"] == 0


def test_masks_at_another_resolution_are_resized_and_another_aspect_is_an_error(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    data = _copy_demo(demo_line, tmp_path / "data")
    size = fitted_scorer.image_size
    mask_path = data / "ground_truth" / "defect" / "defect_0001_mask.png"
    original = np.asarray(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    position = [item.image.name for item in datasets.test_items(data)].index("defect_0001.png")
    before = score_items(fitted_scorer, datasets.test_items(data), 4, progress=False).masks[position]
    larger = cv2.resize(original, (original.shape[1] * 2, original.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(mask_path), larger)
    after = score_items(fitted_scorer, datasets.test_items(data), 4, progress=False).masks[position]
    assert after.shape == (size, size) and after.any() and np.array_equal(after, before)
    cv2.imwrite(str(mask_path), original[:, : original.shape[1] // 2])  # half the width: another aspect ratio
    named = r"defect_0001_mask\.png is 80x160 pixels but its image \S*defect_0001\.png is 160x160"
    with pytest.raises(datasets.DatasetError, match=named):
        score_items(fitted_scorer, datasets.test_items(data), 4, progress=False)


def test_evaluating_into_an_existing_report_replaces_its_overlays_only(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    overlays = tmp_path / "report" / "overlays"
    overlays.mkdir(parents=True)
    stale = overlays / "detected_defect_from_another_model_score9.999.png"
    stale.write_bytes(b"old overlay")
    keep = [overlays / "notes.txt", overlays / "my_annotated_part.png", overlays / "detected_summary.png"]
    for path in keep:
        path.write_bytes(b"not ours")
    _evaluate(fitted_scorer, demo_line.root, tmp_path / "report")
    first = {path.name for path in overlays.iterdir()} - {path.name for path in keep}
    _evaluate(fitted_scorer, demo_line.root, tmp_path / "report")
    second = {path.name for path in overlays.iterdir()} - {path.name for path in keep}
    assert not stale.exists() and all(path.read_bytes() == b"not ours" for path in keep)
    assert len(first) == 12 and second == first  # 4 detected, 4 missed, 4 false alarms: the same names again


def test_a_report_without_pixel_ground_truth_keeps_no_earlier_pro_curve(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    assert _evaluate(fitted_scorer, demo_line.root, report)["pro"] is not None and (report / "pro.png").is_file()
    unlabelled = _copy_demo(demo_line, tmp_path / "no_masks")
    shutil.rmtree(unlabelled / "ground_truth")
    metrics = _evaluate(fitted_scorer, unlabelled, report)
    assert metrics["pro"] is None and not (report / "pro.png").exists()
