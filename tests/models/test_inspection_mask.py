"""Inspection masks: what happens in an ignored region never changes a score, a verdict or a heatmap, and a masked
model stores its mask (models/inspection_mask.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.errors import ArtifactError
from models.images import read_image
from models.inspection_mask import FILE, FILL, InspectionMask, MaskError
from models.scorer import Scorer, preprocess
from models.synthetic import DemoLine
from pipeline.config import Config, ConfigError, config_from_mapping
from tests.models.conftest import TINY

IGNORED_FROM_X = 0.75  # the demo frames' right quarter is ignored (a lot code would sit there)


def write_mask(path: Path, height: int, width: int) -> Path:
    """White inspected, black ignored: the right quarter of a ``height x width`` drawing."""
    mask = np.full((height, width), 255, np.uint8)
    mask[:, int(IGNORED_FROM_X * width) :] = 0
    cv2.imwrite(str(path), mask)
    return path


def mark(frame: np.ndarray, left: float, right: float) -> np.ndarray:
    """A copy of ``frame`` with a dark, noisy block between ``left`` and ``right`` (shares of its width)."""
    height, width = frame.shape[:2]
    marked = frame.copy()
    block = marked[height // 3 : 2 * height // 3, int(left * width) : int(right * width)]
    block[:] = np.random.default_rng(3).integers(0, 60, size=block.shape, dtype=np.uint8)
    return marked


@pytest.fixture(scope="module")
def masked_scorer(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    from models.fit import fit_scorer

    mask = write_mask(tmp_path_factory.mktemp("mask") / "mask.png", 80, 80)  # half the frames' scale: any scale goes
    config = config_from_mapping(TINY | {"model": TINY["model"] | {"inspection_mask": str(mask)}})
    return fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.2)


@pytest.fixture(scope="module")
def good_frame(demo_line: DemoLine) -> np.ndarray:
    labelled = zip(demo_line.test_images, demo_line.test_labels, strict=True)
    return read_image(next(path for path, label in labelled if not label))


def test_a_mask_is_white_where_inspected(tmp_path: Path) -> None:
    mask = InspectionMask.from_image(write_mask(tmp_path / "m.png", 40, 60))
    assert mask.inspected.shape == (40, 60)
    assert mask.inspected[:, :45].all() and not mask.inspected[:, 45:].any()
    assert mask.share == pytest.approx(0.75)
    assert "75.0%" in mask.describe()


def test_a_mask_inspecting_nothing_or_unreadable_is_refused_naming_the_file(tmp_path: Path) -> None:
    black = tmp_path / "black.png"
    cv2.imwrite(str(black), np.zeros((20, 20), np.uint8))
    with pytest.raises(MaskError, match=r"black\.png.*inspects nothing"):
        InspectionMask.from_image(black)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(MaskError, match=r"inspection mask .*broken\.png"):
        InspectionMask.from_image(broken)


def test_ignored_pixels_reach_the_backbone_flat_and_do_not_move_the_standardisation(tmp_path: Path) -> None:
    mask = InspectionMask.from_image(write_mask(tmp_path / "m.png", 64, 64))
    frame = np.random.default_rng(0).integers(60, 200, size=(64, 64, 3), dtype=np.uint8)
    marked = mark(frame, 0.8, 0.95)  # inside the ignored quarter only
    for intensity in ("raw", "standardise"):
        plain = preprocess([frame, marked], 32, intensity=intensity)
        assert not np.allclose(plain[0], plain[1])  # without the mask the mark shows
        masked = preprocess([frame, marked], 32, intensity=intensity, mask=mask)
        assert np.array_equal(masked[0], masked[1])
        assert torch.eq(masked[:, :, :, 24:], FILL).all() and not torch.eq(masked[:, :, :, :24], FILL).all()
    padded = preprocess([frame[:32]], 32, "pad", mask=mask)[0]  # a frame of another aspect keeps its padding
    assert torch.ne(padded[:, :8], FILL).any()


def test_what_happens_in_the_ignored_region_changes_no_score_and_no_heatmap(
    masked_scorer: Scorer, fitted_scorer: Scorer, good_frame: np.ndarray
) -> None:
    assert masked_scorer.threshold is not None and fitted_scorer.threshold is not None
    assert all(member.inspection_mask == masked_scorer.inspection_mask for member in masked_scorer.companions)
    in_ignored, in_inspected = mark(good_frame, 0.8, 0.95), mark(good_frame, 0.3, 0.45)
    masked = masked_scorer.score([good_frame, in_ignored, in_inspected], shift_every_frame=True)
    assert masked.scores[1] == masked.scores[0]
    assert np.array_equal(masked.maps[1], masked.maps[0])
    assert masked.scores[2] > masked_scorer.threshold.value > masked.scores[0]  # a defect where it looks is caught
    assert masked_scorer.inspection_mask is not None
    ignored = ~masked_scorer.inspection_mask.pixels(masked_scorer.image_size).numpy()
    assert (masked.maps[2][ignored] == masked.maps[2][~ignored].min()).all()  # ignored pixels read calm
    shifting = masked_scorer.with_scoring(masked_scorer.scoring.model_copy(update={"shift_pixels": 2}))
    shifted = shifting.score([good_frame, in_ignored], shift_every_frame=True)
    assert shifted.shifted.all() and shifted.scores[1] == shifted.scores[0]  # views moved 2 px take no grey for it
    unmasked = fitted_scorer.score([good_frame, in_ignored], shift_every_frame=True)
    assert unmasked.scores[1] > unmasked.scores[0] + 1.0  # without the mask the same mark counts


def test_a_masked_model_stores_its_mask_and_reloads_to_the_same_scores(
    masked_scorer: Scorer, good_frame: np.ndarray, tmp_path: Path
) -> None:
    from models.artifact import load_scorer

    model_dir = tmp_path / "model"
    masked_scorer.save(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["model"]["inspection_mask"] == FILE and FILE in manifest["files"]
    reloaded = load_scorer(model_dir, device="cpu")
    assert reloaded.inspection_mask == masked_scorer.inspection_mask
    frames = [good_frame, mark(good_frame, 0.3, 0.45)]
    assert np.array_equal(reloaded.score(frames).scores, masked_scorer.score(frames).scores)
    cv2.imwrite(str(model_dir / FILE), np.full((80, 80), 255, np.uint8))  # someone "widens" the mask by hand
    with pytest.raises(ArtifactError, match=FILE):
        load_scorer(model_dir, device="cpu")


def test_a_model_without_mask_records_none(saved_model: Path) -> None:
    """Older lineinspect versions, which know no masks, still load the models that have none."""
    manifest = json.loads((saved_model / "manifest.json").read_text())
    assert "inspection_mask" not in manifest["model"] and FILE not in manifest["files"]


def test_fitting_refuses_a_mask_drawn_on_frames_of_another_aspect(demo_line: DemoLine, tmp_path: Path) -> None:
    from models.fit import fit_scorer

    mask = write_mask(tmp_path / "wide.png", 80, 120)
    config: Config = config_from_mapping(TINY | {"model": TINY["model"] | {"inspection_mask": str(mask)}})
    with pytest.raises(MaskError, match=r"14 of 14 good images do not have the aspect .*wide\.png.* is 160x160"):
        fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False)


def test_a_mask_and_tiling_are_refused_together() -> None:
    with pytest.raises(ConfigError, match=r"inspection_mask cannot be used with model\.resize = 'tile'"):
        config_from_mapping({"model": {"inspection_mask": "mask.png", "resize": "tile"}})


def test_a_registered_masked_model_reloads_its_registration_blind_to_the_ignored_pixels(
    masked_scorer: Scorer, demo_line: DemoLine, tmp_path: Path
) -> None:
    from models.artifact import load_scorer
    from models.registration import build_registration, ignored_grid

    ignored = ignored_grid(masked_scorer.inspection_mask)
    assert ignored is not None and ignored[:, -10:].all() and not ignored[:, :80].any()
    frames = [read_image(path) for path in sorted(demo_line.train_dir.iterdir())[:8]]
    registration = build_registration(frames, ignored=ignored)
    registered = Scorer(masked_scorer.method, masked_scorer.model_settings, masked_scorer.scoring,
                        masked_scorer.training, masked_scorer.threshold, position_stats=masked_scorer.position_stats,
                        companions=masked_scorer.companions, registration=registration,
                        inspection_mask=masked_scorer.inspection_mask)  # fmt: skip
    registered.save(tmp_path / "model")
    reloaded = load_scorer(tmp_path / "model", device="cpu")
    assert reloaded.registration is not None and reloaded.registration.ignored is not None
    assert np.array_equal(reloaded.registration.ignored, ignored)


def test_a_mask_too_thin_for_the_models_size_is_refused_before_fitting(demo_line: DemoLine, tmp_path: Path) -> None:
    """A seam band 3 px high in a 1000-px drawing covers no whole pixel of a 96-px model: fitting ran to its end
    and then failed with torch's "amin(): Expected reduction dim 1 to have non-zero size"."""
    from models.fit import fit_scorer

    drawing = np.zeros((1000, 1000), np.uint8)
    drawing[500:503, 100:900] = 255
    cv2.imwrite(str(tmp_path / "seam.png"), drawing)
    config = config_from_mapping(TINY | {"model": TINY["model"] | {"inspection_mask": str(tmp_path / "seam.png")}})
    with pytest.raises(MaskError, match=r"no whole pixel at 96x96 px .*patchcore.*draw it wider"):
        fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False)
    registered = config_from_mapping(
        TINY
        | {
            "model": TINY["model"]
            | {"inspection_mask": str(tmp_path / "seam.png"), "image_size": 320, "registration": "on"}
        }
    )
    with pytest.raises(MaskError, match=r"no whole pixel at 128x128 px .*registration"):
        fit_scorer(sorted(demo_line.train_dir.iterdir()), registered, progress=False)


def test_scoring_refuses_a_frame_of_another_aspect_than_the_mask_within_fittings_tolerance(
    masked_scorer: Scorer, fitted_scorer: Scorer, good_frame: np.ndarray
) -> None:
    # a camera set to another region of interest: its frames were scored with the mask stretched over them, so the
    # lot code's place was inspected and part of the surface ignored, without a word
    wide = cv2.resize(good_frame, (240, 160))
    assert masked_scorer.aspect_mismatch(160, 240) == (
        "240x160 but the inspection mask is 80x80: a mask is drawn over a frame as the camera delivers it, at any "
        "scale of the same aspect"
    )
    with pytest.raises(MaskError, match=r"image 1 is 240x160 but the inspection mask is 80x80"):
        masked_scorer.score([good_frame, wide])
    with pytest.raises(MaskError, match=r"image 0 is 240x160"):
        masked_scorer.unnormalised_maps([wide])
    assert masked_scorer.aspect_mismatch(160, 163) is None  # rounding of a scale (1.9%), as fitting accepts
    assert masked_scorer.aspect_mismatch(160, 164) is not None  # 2.5%: as fitting refuses
    assert len(masked_scorer.score([cv2.resize(good_frame, (163, 160)), good_frame]).scores) == 2
    assert fitted_scorer.aspect_mismatch(160, 240) is None  # without a mask any frame goes


@pytest.mark.parametrize("shape", [(80, 80), (32, 48), (10, 1000), (1000, 7), (3, 5)])
def test_a_masked_models_warm_up_frame_has_the_masks_aspect(shape: tuple[int, int]) -> None:
    # the worker warmed every model up on a square grey frame: a mask of another aspect now refuses that
    inspected = np.ones(shape, bool)
    mask = InspectionMask(inspected)
    height, width = mask.frame_shape(96)
    assert mask.aspect_mismatch(height, width) is None
    assert min(height, width) >= 64 and (max(height, width) == 96 or min(height, width) == 64)


def test_a_masked_model_warms_up_on_a_frame_it_takes(masked_scorer: Scorer) -> None:
    wide = InspectionMask(np.ones((30, 60), bool))
    scorer = Scorer(masked_scorer.method, masked_scorer.model_settings, masked_scorer.scoring,
                    masked_scorer.training, masked_scorer.threshold, position_stats=masked_scorer.position_stats,
                    inspection_mask=wide)  # fmt: skip
    scorer.warm_up()  # a square frame would be refused
    with pytest.raises(MaskError, match="image 0 is 96x96"):
        scorer.score([np.full((96, 96, 3), 128, np.uint8)])


def rgba_mask(path: Path, transparent_ignored: bool) -> Path:
    """The right quarter ignored: drawn white everywhere and left transparent there (``transparent_ignored``), as an
    editor's eraser leaves it, or black and opaque."""
    bgra = np.full((40, 60, 4), 255, np.uint8)
    if transparent_ignored:
        bgra[:, 45:, 3] = 0
    else:
        bgra[:, 45:, :3] = 0
    cv2.imwrite(str(path), bgra)
    return path


def test_a_mask_with_transparent_pixels_is_refused_naming_the_file(tmp_path: Path) -> None:
    # the alpha channel was dropped: an "ignored" region left transparent over white read as inspected, every pixel
    with pytest.raises(MaskError, match=r"erased\.png: 25\.00% of the inspection mask's pixels are transparent"):
        InspectionMask.from_image(rgba_mask(tmp_path / "erased.png", transparent_ignored=True))
    opaque = InspectionMask.from_image(rgba_mask(tmp_path / "opaque.png", transparent_ignored=False))
    assert opaque == InspectionMask.from_image(write_mask(tmp_path / "grey.png", 40, 60))  # alpha all opaque: fine


@pytest.mark.parametrize("layout", ["grey_alpha", "palette", "grey_colour_key", "rgba_16_bit"])
def test_transparency_is_refused_however_the_file_holds_it(layout: str, tmp_path: Path) -> None:
    from PIL import Image

    grey = np.full((40, 60), 255, np.uint8)
    grey[:, 45:] = 0
    path = tmp_path / f"{layout}.png"
    if layout == "grey_alpha":  # GIMP's grey image with an alpha channel
        Image.fromarray(np.dstack([grey, np.where(grey > 0, 255, 128).astype(np.uint8)]), "LA").save(path)
    elif layout == "palette":
        Image.fromarray(grey).convert("P").save(path, transparency=0)
    elif layout == "grey_colour_key":  # a tRNS chunk naming black transparent, which OpenCV drops
        Image.fromarray(grey).save(path, transparency=0)
    else:
        bgra = np.full((40, 60, 4), 65535, np.uint16)
        bgra[:, 45:, 3] = 30000
        cv2.imwrite(str(path), bgra)
    with pytest.raises(MaskError, match=rf"{layout}\.png: 25\.00% of the inspection mask's pixels are transparent"):
        InspectionMask.from_image(path)
    Image.fromarray(grey).save(tmp_path / "plain.png")
    assert InspectionMask.from_image(tmp_path / "plain.png").share == pytest.approx(0.75)


def test_a_median_baseline_is_the_median_of_inspected_pixels(masked_scorer: Scorer, good_frame: np.ndarray) -> None:
    # the ignored quarter reads as the frame's lowest inspected value: in the median it pulled every map's zero down
    relative = masked_scorer.with_scoring(masked_scorer.scoring.model_copy(update={"map_baseline": "median"}))
    frames = [good_frame, mark(good_frame, 0.3, 0.45)]
    absolute, shifted = masked_scorer.score(frames), relative.score(frames)
    assert masked_scorer.inspection_mask is not None
    inspected = masked_scorer.inspection_mask.pixels(masked_scorer.image_size).numpy()
    for plain, baselined in zip(absolute.maps, shifted.maps, strict=True):
        median = float(np.median(plain[inspected]))
        assert median > float(np.median(plain))  # the ignored pixels would move it
        np.testing.assert_allclose(baselined, plain - median, atol=1e-5)
        assert abs(float(np.median(baselined[inspected]))) < 1e-5
    np.testing.assert_array_equal(shifted.scores, absolute.scores)


def test_lineinspect_score_reports_a_file_of_another_aspect_and_scores_the_others(
    masked_scorer: Scorer, good_frame: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.cli import main

    masked_scorer.save(tmp_path / "model")
    cv2.imwrite(str(tmp_path / "wide.png"), cv2.resize(good_frame, (240, 160)))
    cv2.imwrite(str(tmp_path / "good.png"), good_frame)
    code = main(["score", "--model", str(tmp_path / "model"), str(tmp_path / "wide.png"), str(tmp_path / "good.png"),
                 "--json"])  # fmt: skip
    output = capsys.readouterr()
    assert code == 1
    assert f"error: {tmp_path / 'wide.png'} is 240x160 but the inspection mask is 80x80" in output.err
    assert [Path(result["image"]).name for result in json.loads(output.out)] == ["good.png"]


def wide_copy(good_frame: np.ndarray, path: Path) -> Path:
    """``good_frame`` stretched to 240x160: a camera set to another region of interest than the mask was drawn on."""
    cv2.imwrite(str(path), cv2.resize(good_frame, (240, 160)))
    return path


def test_lineinspect_evaluate_refuses_test_images_of_another_aspect_before_scoring(
    masked_scorer: Scorer, demo_line: DemoLine, good_frame: np.ndarray, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # it scored the images before it, then stopped with "image 0 is 240x160 ...", naming no file
    from workers.cli import main

    masked_scorer.save(tmp_path / "model")
    data = tmp_path / "data"
    shutil.copytree(demo_line.root, data)
    wide = wide_copy(good_frame, data / "test" / "good" / "zz_wide.png")  # listed last: the others come first
    report = tmp_path / "report"
    code = main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(report)])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert (f"lineinspect evaluate: error: 1 of 13 test images do not have the aspect of the model's inspection mask, "
            f"e.g. {wide} is 240x160 but the inspection mask is 80x80") in error  # fmt: skip
    assert "nothing was scored" in error and "evaluate: scoring" not in error  # refused before the progress bar
    assert not (report / "metrics.json").exists()


def test_lineinspect_calibrate_refuses_images_of_another_aspect_before_scoring_and_keeps_the_threshold(
    masked_scorer: Scorer, demo_line: DemoLine, good_frame: np.ndarray, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from workers.cli import main

    model = tmp_path / "model"
    masked_scorer.save(model)
    before = json.loads((model / "manifest.json").read_text())
    good = tmp_path / "good"
    shutil.copytree(demo_line.root / "test" / "good", good)
    wide = wide_copy(good_frame, good / "zz_wide.png")
    calibrate = ["calibrate", "--model", str(model), "--false-reject-rate", "0.2"]
    assert main([*calibrate, "--good", str(good)]) == 2
    error = capsys.readouterr().err
    assert (f"lineinspect calibrate: error: 1 of 7 good images do not have the aspect of the model's inspection mask, "
            f"e.g. {wide} is 240x160 but the inspection mask is 80x80") in error  # fmt: skip
    assert "nothing was scored" in error and "calibrate: scoring" not in error and "Traceback" not in error
    # labelled images (--data) are checked before the good ones are scored, not after
    wide.unlink()
    data = tmp_path / "data"
    shutil.copytree(demo_line.root, data)
    wide = wide_copy(good_frame, data / "test" / "defect" / "zz_wide.png")
    assert main([*calibrate, "--good", str(good), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert f"1 of 13 labelled images do not have the aspect of the model's inspection mask, e.g. {wide} is" in error
    assert "calibrate: scoring" not in error
    assert json.loads((model / "manifest.json").read_text()) == before
    wide.unlink()
    assert main([*calibrate, "--good", str(good), "--data", str(data), "--quiet"]) == 0  # the rest calibrate as before
