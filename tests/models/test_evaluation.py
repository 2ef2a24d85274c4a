import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models import datasets  # a module import: pytest would collect `test_items` as a test
from models.evaluation import auroc, f1_max, pixel_auroc, pro_auc, pro_auc_from_curve, pro_curve, roc_curve
from models.report import evaluate, overlay_groups, score_items
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
    maps = np.random.default_rng(0).uniform(0.1, 0.5, (1, 64, 64)).astype(np.float32)  # good pixels
    maps[0, :32, :32] = 1.0
    maps[0, 50:52, 50:52] = 0.0  # below every good pixel: not found before FPR 1
    assert pro_auc(masks, maps) == pytest.approx(0.5, abs=1e-12)  # weighted by pixels it would be 1024 / 1028


def test_f1_max() -> None:
    assert f1_max(np.array([0, 1, 1]), np.array([0.1, 0.5, 0.7])) == 1.0


def test_pixel_auroc_equals_the_pairwise_probability_over_all_pixels_with_ties() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:6, 3:8] = masks[2, 7:11, 1:3] = True
    maps = np.round(rng.normal(masks * 0.8, 1.0), 1).astype(np.float32)  # float32 maps, ties between classes
    expected = _mann_whitney(masks.ravel().astype(int), maps.ravel().astype(np.float64))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AD's PRO, literally: scipy's 8-connected regions, every distinct score as a threshold (flagged when
    >=), the polyline from (0, 0) through every threshold's (FPR, mean region overlap), cut at the limit by linear
    interpolation, area / limit."""
    import scipy.ndimage

    regions = [
        region_labels == region
        for mask in masks
        for region_labels, count in [scipy.ndimage.label(mask, structure=np.ones((3, 3)))]
        for region in range(1, count + 1)
    ]
    region_images = [next(i for i, mask in enumerate(masks) if (mask & region).any()) for region in regions]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        flagged = maps >= threshold
        fpr = (flagged & ~masks).sum() / (~masks).sum()
        overlap = np.mean([flagged[i][region].mean() for i, region in zip(region_images, regions, strict=True)])
        points.append((float(fpr), float(overlap)))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("decimals", [None, 1])
def test_pro_equals_the_mvtec_definition_computed_by_brute_force(decimals: int | None) -> None:
    """Random regions and smoothed noisy maps, with and without ties (rounded maps). The curve of 300 levels this
    replaced was 6e-4 off here without ties (its chords) and 8e-5 with them (elsewhere up to 0.018: it extended the
    curve flat to FPR 0.3 where tied good pixels jump past it)."""
    import scipy.ndimage

    rng = np.random.default_rng(11)
    masks = np.zeros((4, 24, 24), bool)
    for image in (1, 2, 3):
        for _ in range(image):
            top, left = rng.integers(0, 18, 2)
            height, width = rng.integers(1, 7, 2)
            masks[image, top : top + height, left : left + width] = True
    maps = scipy.ndimage.gaussian_filter(rng.normal(0, 1, masks.shape), (0, 1.5, 1.5)) + 0.6 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    maps = maps.astype(np.float32)
    assert pro_auc(masks, maps) == pytest.approx(_brute_force_pro(masks, maps), abs=1e-9)


def test_pro_interpolates_linearly_at_the_limit_where_tied_good_pixels_jump_past_it() -> None:
    """10 good pixels at 1, the other 86 and half the defect at 0: from (10/96, 0.5) the curve's next point is
    (1, 1), and at FPR 0.3 it is 0.5 + 0.5 (0.3 - 10/96) / (1 - 10/96), not the 0.5 a flat extension gives."""
    masks, maps = np.zeros((1, 10, 10), bool), np.zeros((1, 10, 10), np.float32)
    masks[0, :2, :2] = True
    maps[0, 0, :2] = 2.0  # half the region above every good pixel
    maps[0, 9, :10] = 1.0  # 10 of the 96 good pixels
    low = 10 / 96
    at_limit = 0.5 + 0.5 * (0.3 - low) / (1 - low)
    expected = (0.5 * low + (0.5 + at_limit) / 2 * (0.3 - low)) / 0.3
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, low, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1])
    assert pro_auc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pro_regions_are_8_connected_and_false_positives_count_good_pixels_of_defective_images() -> None:
    masks, maps = np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8), np.float32)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # touching at a corner: one region of two pixels
    masks[0, 6, 6] = True  # a second region
    maps[0, 1, 1] = 3.0
    maps[0, 5, 0] = 2.0  # a good pixel of the defective image: the only false positive above 1
    maps[1] += 1.0  # the defect-free image: all its pixels at 1
    fpr, pro = pro_curve(masks, maps)
    good = 2 * 64 - 3
    np.testing.assert_allclose(fpr[:4], [0, 0, 1 / good, 65 / good])
    np.testing.assert_allclose(pro[:4], [0, 0.25, 0.25, 0.25])  # (1/2 + 0) / 2 regions; 4-connected would be 1/3


def test_pro_area_needs_a_curve_reaching_the_limit() -> None:
    assert pro_auc_from_curve(np.array([0.0, 0.5]), np.array([0.0, 1.0])) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"at least 0\.3"):
        pro_auc_from_curve(np.array([0.0, 0.2]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="defect regions"):
        pro_curve(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


def test_f1_max_equals_a_brute_force_search_over_thresholds_with_ties() -> None:
    from models.threshold import best_f1_threshold

    rng = np.random.default_rng(4)
    for _ in range(20):
        labels = rng.integers(0, 2, 60)
        labels[0] = 1
        scores = np.round(rng.normal(labels * 0.8, 1.0), 1)
        best = 0.0
        for threshold in np.unique(scores):
            flagged = scores >= threshold
            true_positives = (flagged & (labels == 1)).sum()
            best = max(best, 2 * true_positives / (flagged.sum() + labels.sum()))
        value, f1 = best_f1_threshold(labels, scores)
        flagged = scores > value  # the returned threshold gives that F1 under the scorer's "fail = above"
        f1_at_value = 2 * (flagged & (labels == 1)).sum() / (flagged.sum() + labels.sum())
        assert f1 == pytest.approx(best, abs=1e-12) and f1 == pytest.approx(f1_at_value, abs=1e-12)
        assert f1_max(labels, scores) == f1


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


def test_evaluate_checks_every_mask_before_scoring_anything(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last defective images' masks are unusable (another aspect, unreadable): evaluate names both and stops
    before scoring the first batch (it used to stop only on reaching them, after scoring every batch before)."""
    data = _copy_demo(demo_line, tmp_path / "data")
    masks = sorted((data / "ground_truth" / "defect").iterdir())
    wide, broken = masks[-2], masks[-1]
    cv2.imwrite(str(wide), np.zeros((160, 240), np.uint8))
    broken.write_bytes(b"not a png")

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored before the masks were checked")

    monkeypatch.setattr(fitted_scorer, "score", no_scoring)
    with pytest.raises(datasets.DatasetError) as raised:
        _evaluate(fitted_scorer, data, tmp_path / "report")
    message = str(raised.value)
    assert message.startswith("2 of 6 masks cannot be used") and "nothing was scored" in message
    assert f"mask {wide} is 240x160 pixels but its image" in message and f"mask {broken} of " in message
    assert not (tmp_path / "report" / "metrics.json").exists()


def test_thinned_curves_keep_their_ends_and_steps() -> None:
    from models.report import _thinned

    rng = np.random.default_rng(2)
    labels = rng.random(200_000) < 0.1
    fpr, tpr = roc_curve(labels, np.round(rng.normal(labels * 1.0, 1.0), 3))
    x, y = _thinned(fpr, tpr, points=100)
    assert x.size <= 400 < fpr.size and (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.isin(x, fpr).all() and (np.diff(x) >= 0).all()
    assert np.trapezoid(y, x) == pytest.approx(np.trapezoid(tpr, fpr), abs=2e-4)


def _plotted_curves(scorer: Scorer, data: Path, out_dir: Path,
                    monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """What evaluate hands to ``_plot_curves`` (which still draws them), and its metrics."""
    from models import report

    plotted: list[Any] = []
    plot = report._plot_curves

    def capture(out_dir: Path, curves: Any, metrics: dict[str, Any]) -> None:
        plotted.append(curves)
        plot(out_dir, curves, metrics)

    monkeypatch.setattr(report, "_plot_curves", capture)
    metrics = _evaluate(scorer, data, out_dir)
    return plotted[0], metrics


def test_the_plotted_curves_are_the_ones_whose_areas_are_reported(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    curves, metrics = _plotted_curves(fitted_scorer, demo_line.root, tmp_path / "report", monkeypatch)
    assert np.trapezoid(curves.image_roc[1], curves.image_roc[0]) == metrics["image_auroc"]
    assert np.trapezoid(curves.pixel_roc[1], curves.pixel_roc[0]) == pytest.approx(metrics["pixel_auroc"], abs=1e-3)
    assert pro_auc_from_curve(*curves.pro) == pytest.approx(metrics["pro"], abs=1e-3)
    assert (tmp_path / "report" / "roc.png").is_file() and (tmp_path / "report" / "pro.png").is_file()
    # the threshold's operating point: the reported rates, a point of the image ROC
    fpr, tpr = curves.operating_point
    assert (fpr, tpr) == (metrics["false_reject_rate"], metrics["detection_rate"])
    assert np.any((curves.image_roc[0] == fpr) & (curves.image_roc[1] == tpr))


def test_the_report_plots_each_defect_types_image_roc(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _copy_demo(demo_line, tmp_path / "data")
    for name in ("test", "ground_truth"):
        (data / name / "stain").mkdir()
    for image in sorted((data / "test" / "defect").iterdir())[:3]:  # half the defects become another type
        image.rename(data / "test" / "stain" / image.name)
        mask = f"{image.stem}_mask.png"
        (data / "ground_truth" / "defect" / mask).rename(data / "ground_truth" / "stain" / mask)
    curves, metrics = _plotted_curves(fitted_scorer, data, tmp_path / "report", monkeypatch)
    assert sorted(curves.image_roc_by_type) == ["defect", "stain"]
    for defect_type, (fpr, tpr) in curves.image_roc_by_type.items():
        assert np.trapezoid(tpr, fpr) == metrics["image_auroc_by_type"][defect_type]
    _evaluate(fitted_scorer, demo_line.root, tmp_path / "one_type")
    two_types, one_type = (cv2.imread(str(tmp_path / report / "roc.png")) for report in ("report", "one_type"))
    assert two_types is not None and one_type is not None
    assert two_types.shape[1] > 1.5 * one_type.shape[1]  # the types' curves in a panel beside the ROC


def test_report_overlays_outline_the_ground_truth_where_the_defect_is(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    """An engineer needs to see whether the heat lies on the defect: the MTD report's highest-scoring "detected"
    blowhole was hot at the bottom edge of its tile, far from the blowhole; the overlay did not show where that was."""
    from models.heatmap import MASK_BGR, enlargement

    _evaluate(fitted_scorer, demo_line.root, tmp_path / "report")
    overlays = sorted((tmp_path / "report" / "overlays").glob("*.png"))
    outlined = 0
    for overlay_path in overlays:
        name = overlay_path.name
        stem = name.split("_defect_", 1)[1].rsplit("_score", 1)[0] if "_defect_" in name else None
        overlay = cv2.imread(str(overlay_path))
        assert overlay is not None
        magenta = np.abs(overlay.astype(int) - MASK_BGR).max(axis=2) == 0
        if stem is None:  # a good image: no mask, no outline
            assert not magenta.any(), overlay_path.name
            continue
        mask = np.asarray(cv2.imread(str(demo_line.root / "ground_truth" / "defect" / f"{stem}_mask.png"), 0), np.uint8)
        factor = enlargement(*mask.shape[:2])
        picture = magenta[: mask.shape[0] * factor]
        edge = cv2.morphologyEx(np.asarray(mask > 127, np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        near_edge = cv2.dilate(cv2.resize(edge, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST),
                               np.ones((2 * factor + 3, 2 * factor + 3), np.uint8)).astype(bool)  # fmt: skip
        assert picture.sum() > 20 and not (picture & ~near_edge).any(), overlay_path.name
        outlined += 1
    assert outlined >= 2


def test_masks_resized_to_the_map_stay_on_their_defect(tmp_path: Path) -> None:
    """Frames are resized centre on centre (INTER_AREA); their masks must land where the defects do. cv2's
    INTER_NEAREST put them about half a map pixel down and right (0.5 px on average here, 400x300 -> 224)."""
    from models.report import _read_item_mask

    def centre(array: np.ndarray) -> np.ndarray:
        weights = array.astype(np.float64)
        rows, columns = np.mgrid[: array.shape[0], : array.shape[1]]
        return np.array([(weights * rows).sum(), (weights * columns).sum()]) / weights.sum()

    rng = np.random.default_rng(0)
    errors = []
    for number in range(40):
        mask = np.zeros((400, 300), np.uint8)
        top, left = int(rng.integers(10, 340)), int(rng.integers(10, 240))
        height, width = rng.integers(6, 50, 2)
        mask[top : top + height, left : left + width] = 255
        path = tmp_path / f"mask_{number}.png"
        cv2.imwrite(str(path), mask)
        item = datasets.TestItem(tmp_path / "image.png", 1, "crack", path)
        resized = _read_item_mask(item, (400, 300), 224)
        frame = cv2.resize(mask, (224, 224), interpolation=cv2.INTER_AREA)  # as the scorer resizes a frame
        errors.append(centre(resized) - centre(frame))
    assert np.abs(np.mean(errors, axis=0)).max() < 0.1


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
    assert first and second == first  # the same names again
    assert fitted_scorer.threshold is not None
    for name in first:  # each named by its verdict: detected / false_alarm fail, missed / good_passed pass
        group, score = name.split("_defect_")[0].split("_good_")[0], float(name.rsplit("_score", 1)[1][: -len(".png")])
        assert (group in ("detected", "false_alarm")) == (score > fitted_scorer.threshold.value), name


def test_a_report_without_pixel_ground_truth_keeps_no_earlier_pro_curve(
    fitted_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    assert _evaluate(fitted_scorer, demo_line.root, report)["pro"] is not None and (report / "pro.png").is_file()
    unlabelled = _copy_demo(demo_line, tmp_path / "no_masks")
    shutil.rmtree(unlabelled / "ground_truth")
    metrics = _evaluate(fitted_scorer, unlabelled, report)
    assert metrics["pro"] is None and not (report / "pro.png").exists()


def test_overlay_groups_name_each_image_by_its_verdict_at_the_threshold() -> None:
    # the demo's report once showed "missed_defect_..._score103.457" beside a threshold of 3.2: the lowest-scoring
    # defects were called missed whether or not they passed, and the highest-scoring good images false alarms
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([9.0, 2.0, 7.0, 0.5, 4.0, 1.0, 2.5, 0.1, 3.0])
    groups = overlay_groups(labels, scores, threshold=3.0, per_group=2)
    assert groups["detected"].tolist() == [0, 2]
    assert groups["missed"].tolist() == [3, 1]  # lowest first
    assert groups["false_alarm"].tolist() == [4]  # only the one good image above 3.0
    assert groups["good_passed"].tolist() == [8, 6]  # at the threshold passes: fail is strictly above
    caught_all = overlay_groups(labels, scores, threshold=0.0)
    assert caught_all["missed"].size == 0 and caught_all["good_passed"].size == 0
    unthresholded = overlay_groups(labels, scores, threshold=None, per_group=1)
    assert {name: group.tolist() for name, group in unthresholded.items()} == {
        "highest_defect": [0], "lowest_defect": [3], "highest_good": [4]}  # fmt: skip


def test_roc_refuses_nan_scores_instead_of_ranking_them_least_anomalous() -> None:
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="1 NaN among 4"):
        roc_curve(labels, np.array([0.1, 0.2, np.nan, 0.9]))


def test_tied_infinite_scores_count_one_half() -> None:
    """np.diff of two equal infinities is NaN, which once split a tie of +inf (or -inf) scores into ranked steps:
    a defect and a good image both at +inf scored AUROC 1, not the 0.5 a tie is worth."""
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([np.inf, np.inf, -np.inf, -np.inf, 2.0, 1.0])
    assert auroc(labels, scores) == pytest.approx(_mann_whitney(labels, scores), abs=1e-12)
    assert auroc(np.array([1, 0]), np.array([np.inf, np.inf])) == 0.5


def test_pro_takes_tied_infinite_scores_as_one_threshold() -> None:
    masks, maps = np.zeros((1, 4, 5), bool), np.zeros((1, 4, 5))
    masks[0, 0, :2] = True  # one region of 2 pixels; 18 good pixels
    maps[0, 0, 0] = maps[0, 3, 4] = np.inf  # half the region and one good pixel, tied at +inf
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 1 / 18, 1])  # no point (0, 0.5): the tie is one step
    np.testing.assert_allclose(pro, [0, 0.5, 1])
    assert pro_auc(masks, maps) == pytest.approx(_brute_force_pro(masks, maps), abs=1e-12)


def test_pro_refuses_nan_maps() -> None:
    masks, maps = np.zeros((1, 4, 4), bool), np.random.default_rng(0).random((1, 4, 4))
    masks[0, 0, 0] = True
    maps[0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN among 16"):
        pro_curve(masks, maps)


def test_pro_stops_at_a_point_exactly_at_the_limit_whatever_rises_above_it() -> None:
    """10 good pixels: 3 of them highest put a point exactly at FPR 0.3; the defect's second half comes next,
    with no good pixel between, a vertical step at 0.3 that adds no area (MVTec's trapezoid keeps x <= 0.3)."""
    masks, maps = np.zeros((1, 3, 4), bool), np.zeros((1, 3, 4))
    masks[0, 0, :2] = True  # one region of 2 pixels, 10 good pixels
    maps[0, 0, 0] = 9.0  # half the region first
    maps[0, 2, :3] = 8.0  # then 3 good pixels: FPR 0.3 exactly
    maps[0, 0, 1] = 7.0  # then the other half: PRO 1 at FPR 0.3
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr[:4], [0, 0, 0.3, 0.3])
    np.testing.assert_allclose(pro[:4], [0, 0.5, 0.5, 1])
    assert pro_auc(masks, maps) == pytest.approx(0.5, abs=1e-12)  # 0.5 all along [0, 0.3]
    assert pro_auc(masks, maps) == pytest.approx(_brute_force_pro(masks, maps), abs=1e-12)


def _nearest_exact_reference(source: np.ndarray, size: int) -> np.ndarray:
    """Centre-on-centre nearest neighbour, written out: output pixel i takes source pixel floor((i + 1/2) n / size)."""
    rows = np.floor((np.arange(size) + 0.5) * source.shape[0] / size).astype(int)
    columns = np.floor((np.arange(size) + 0.5) * source.shape[1] / size).astype(int)
    return source[rows][:, columns]


@pytest.mark.parametrize(("shape", "size"), [((300, 400), 224), ((100, 60), 224), ((224, 224), 224)])
def test_soft_edged_masks_are_cut_at_128_and_resized_by_nearest_neighbour(
    tmp_path: Path, shape: tuple[int, int], size: int
) -> None:
    """A mask with anti-aliased edges (every grey level present): defective where >= 128, then each map pixel takes
    the source pixel under its centre, never a blend (a blurred and re-thresholded mask would grow or shrink)."""
    from models.report import _read_item_mask

    rng = np.random.default_rng(1)
    soft = cv2.GaussianBlur((rng.random(shape) < 0.004).astype(np.float32) * 255, (0, 0), 3) * 100
    soft = np.clip(soft, 0, 255).astype(np.uint8)
    soft.flat[:256] = np.arange(256)  # every grey level, 127 and 128 side by side
    assert 0 < (soft >= 128).mean() < 0.5 and np.isin([1, 127, 128, 254], soft).all()
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), soft)
    item = datasets.TestItem(tmp_path / "image.png", 1, "crack", path)
    resized = _read_item_mask(item, shape, size)
    assert resized.dtype == bool and resized.shape == (size, size)
    np.testing.assert_array_equal(resized, _nearest_exact_reference(soft >= 128, size))
