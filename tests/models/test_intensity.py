"""Choosing standardised or raw frames from good frames (models/intensity.py), and fitting with intensity "auto"."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from models.intensity import MIN_FRAMES, RAW_RATIO, choose_intensity, choose_intensity_from
from models.scorer import preprocess
from pipeline.config import config_from_mapping
from tests.models.conftest import TINY


def _crops(texture: np.ndarray, count: int, rng: np.random.Generator, size: int = 96) -> list[np.ndarray]:
    tops = rng.integers(0, texture.shape[0] - size, count)
    lefts = rng.integers(0, texture.shape[1] - size, count)
    return [texture[top : top + size, left : left + size] for top, left in zip(tops, lefts, strict=True)]


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def exposure_frames(count: int = 40, seed: int = 0) -> list[np.ndarray]:
    """One texture seen brighter or darker: gain 0.7-1.3, offset +-20 grey levels."""
    rng = np.random.default_rng(seed)
    frames = []
    for crop in _crops(skimage.data.brick(), count, rng):
        drifted = crop.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-20, 20)
        frames.append(_rgb(np.clip(drifted, 0, 255).astype(np.uint8)))
    return frames


def content_frames(count: int = 40, seed: int = 0) -> list[np.ndarray]:
    """A steady pale background (grey 215, noise) beside a dark texture covering 20-80% of the frame."""
    rng = np.random.default_rng(seed)
    frames = []
    for crop in _crops(skimage.data.brick(), count, rng):
        frame = np.clip(215 + rng.normal(0, 3, crop.shape), 0, 255).astype(np.uint8)
        width = int(rng.uniform(0.2, 0.8) * crop.shape[1])
        frame[:, :width] = (crop[:, :width] * 0.5).astype(np.uint8)
        frames.append(_rgb(frame))
    return frames


def test_exposure_drift_is_standardised() -> None:
    choice = choose_intensity_from(exposure_frames())
    assert choice.intensity == "standardise"
    assert choice.ratio < 1.0  # standardising narrows every level's spread over the frames
    assert choice.describe().startswith("auto: standardise")


def test_frames_differing_in_content_stay_raw() -> None:
    choice = choose_intensity_from(content_frames())
    assert choice.intensity == "raw"
    assert choice.ratio >= RAW_RATIO
    assert choice.level > 0.5  # the pale background's level is the one standardising disturbs
    assert "content varies" in choice.describe()


def test_levels_held_by_clipping_do_not_count() -> None:
    # Exposure drift with the brightest pixels saturated: raw frames hold the top levels at 255 because they clip,
    # and standardising them would spread those levels; they must not turn the choice to raw.
    rng = np.random.default_rng(3)
    frames = []
    for frame in exposure_frames(seed=3):
        bright = frame.astype(np.float32) * 1.6 + rng.uniform(40, 60)
        frames.append(np.clip(bright, 0, 255).astype(np.uint8))
    assert np.median([np.quantile(frame, 0.85) for frame in frames]) == 255  # the top levels really are clipped
    assert choose_intensity_from(frames).intensity == "standardise"


def test_too_few_frames_standardise_and_say_why() -> None:
    choice = choose_intensity_from(content_frames(count=MIN_FRAMES - 1))
    assert choice.intensity == "standardise"
    assert f"only {MIN_FRAMES - 1} readable good frames" in choice.describe()


def test_files_are_sampled_and_unreadable_ones_passed_over(tmp_path: Path) -> None:
    paths = []
    for number, frame in enumerate(content_frames(count=20)):
        paths.append(tmp_path / f"frame_{number:02d}.png")
        cv2.imwrite(str(paths[-1]), frame)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    choice = choose_intensity([*paths, tmp_path / "broken.png"])
    assert (choice.intensity, choice.frames) == ("raw", 20)


def test_preprocess_refuses_an_unresolved_choice() -> None:
    with pytest.raises(ValueError, match="intensity 'auto' must be resolved"):
        preprocess(exposure_frames(count=1), 32, intensity="auto")


def test_fit_resolves_auto_and_the_saved_model_keeps_the_choice(tmp_path: Path) -> None:
    from models.artifact import load_scorer
    from models.fit import fit_scorer

    good = tmp_path / "good"
    good.mkdir()
    for number, frame in enumerate(content_frames(count=16)):
        cv2.imwrite(str(good / f"frame_{number:02d}.png"), frame)
    config = config_from_mapping(TINY | {"model": {**TINY["model"], "intensity": "auto"}})
    scorer = fit_scorer(sorted(good.iterdir()), config, progress=False, holdout_fraction=0.2)
    assert scorer.model_settings.intensity == "raw"
    assert all(member.model_settings.intensity == "raw" for member in scorer.companions)
    assert scorer.training.intensity_choice.startswith("auto: raw")
    scorer.save(tmp_path / "model")
    loaded = load_scorer(tmp_path / "model")
    assert loaded.model_settings.intensity == "raw"
    assert loaded.training.intensity_choice == scorer.training.intensity_choice


@pytest.mark.parametrize("bits", [10, 12])
def test_camera_data_of_10_or_12_bits_in_16_is_judged_on_its_own_range(bits: int) -> None:
    """Scaled to 8 bits as 16-bit data, 10-bit frames keep 4 grey levels, under the one-level noise floor."""
    full = 2**bits - 1
    for frames, expected in ((content_frames(), "raw"), (exposure_frames(), "standardise")):
        deep = [np.round(frame * (full / 255)).astype(np.uint16) for frame in frames]
        choice = choose_intensity_from(deep)
        assert choice.intensity == expected == choose_intensity_from(frames).intensity
        assert choice.ratio == pytest.approx(choose_intensity_from(frames).ratio, rel=0.1)


def test_what_an_inspection_mask_ignores_does_not_choose_the_intensity(tmp_path: Path) -> None:
    """Frames are standardised over their inspected pixels only, so those decide. A lot code's dark print in the
    ignored quarter, at one grey level in every frame whatever the exposure, made fitting choose raw frames for a
    line whose inspected surface (one part, seen brighter or darker) only drifts in exposure."""
    from models.fit import fit_scorer
    from models.inspection_mask import InspectionMask

    part = _crops(skimage.data.brick(), 1, np.random.default_rng(5))[0]
    good = tmp_path / "good"
    good.mkdir()
    for number in range(16):
        frame = np.clip(part.astype(np.float32) * (0.7 + 0.04 * number), 0, 255).astype(np.uint8)
        frame[:, 72:] = 235  # the label
        frame[: 24 + 4 * number, 72:] = 15  # its print, longer on each part
        cv2.imwrite(str(good / f"frame_{number:02d}.png"), frame)
    drawing = np.full((96, 96), 255, np.uint8)
    drawing[:, 72:] = 0
    cv2.imwrite(str(tmp_path / "mask.png"), drawing)
    mask = InspectionMask.from_image(tmp_path / "mask.png")
    assert choose_intensity(sorted(good.iterdir())).intensity == "raw"  # the print alone decides without the mask
    assert choose_intensity(sorted(good.iterdir()), mask).intensity == "standardise"
    model = {**TINY["model"], "intensity": "auto", "inspection_mask": str(tmp_path / "mask.png")}
    scorer = fit_scorer(sorted(good.iterdir()), config_from_mapping(TINY | {"model": model}), progress=False,
                        holdout_fraction=0.2)  # fmt: skip
    assert scorer.model_settings.intensity == "standardise"
    assert scorer.training.intensity_choice.startswith("auto: standardise")
