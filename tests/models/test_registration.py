"""Registering frames to the good frames' pose (models/registration.py), and fitting and scoring with it."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from models.images import read_image
from models.registration import (
    FILL_SIDE,
    SIDE,
    Registration,
    build_registration,
    choose_registration,
    estimate_pose,
    scaled,
)
from models.synthetic import DemoLine
from pipeline.config import config_from_mapping
from tests.models.conftest import TINY

PART = 200  # frames of the coins part


def _coins() -> np.ndarray:
    return np.repeat(skimage.data.coins()[..., None], 3, axis=2)


def moved(image: np.ndarray, dx: float, dy: float, degrees: float) -> np.ndarray:
    """``image`` rotated about its centre and translated (content moves by (dx, dy) px), borders replicated."""
    height, width = image.shape[:2]
    matrix: np.ndarray = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)


def part(dx: float = 0.0, dy: float = 0.0, degrees: float = 0.0) -> np.ndarray:
    """The centre ``PART x PART`` of scikit-image's coins, the part moved on its fixture first."""
    photo = moved(_coins(), dx, dy, degrees)
    top, left = (photo.shape[0] - PART) // 2, (photo.shape[1] - PART) // 2
    return photo[top : top + PART, left : left + PART].copy()


def good_parts(count: int, seed: int, max_shift: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(count):
        dx, dy = rng.uniform(-max_shift, max_shift, 2)
        parts.append(part(dx, dy, rng.uniform(-0.5, 0.5)))
    return parts


def _grid(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


def _registration() -> Registration:
    return build_registration(good_parts(12, seed=0))


def _centre_ncc(a: np.ndarray, b: np.ndarray) -> float:
    inner = slice(a.shape[0] // 8, a.shape[0] - a.shape[0] // 8)
    x = a[inner, inner].astype(np.float64) - a[inner, inner].mean()
    y = b[inner, inner].astype(np.float64) - b[inner, inner].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def test_pose_of_a_moved_part_is_recovered() -> None:
    registration = _registration()
    transform, response = estimate_pose(registration.reference, _grid(part(dx=7, dy=-4, degrees=2.5)))
    scale = SIDE / PART  # grid pixels per frame pixel
    centre = (SIDE - 1) / 2
    # the part turned about its centre, which the transform therefore takes to the centre moved by (7, -4) px
    assert transform @ np.array([centre, centre, 1.0]) == pytest.approx(centre + np.array([7, -4]) * scale, abs=0.3)
    # OpenCV's positive angles turn the image counter-clockwise as displayed (y down): -2.5 degrees here
    assert np.degrees(np.arctan2(transform[1, 0], transform[0, 0])) == pytest.approx(-2.5, abs=0.3)
    assert response > 0.5


def test_aligned_frames_match_the_reference_and_maps_go_back_to_the_frame() -> None:
    registration = _registration()
    frame = part(dx=8, dy=5, degrees=-3)
    marked = frame.copy()
    marked[120:136, 60:76] = 255  # a bright square where the map should point, in the frame as it came
    (aligned, aligned_marked), poses = registration.align([frame, marked])
    assert aligned.shape == frame.shape
    assert _centre_ncc(aligned, part()) > 0.98 > _centre_ncc(frame, part()) + 0.2
    # the strips the moved frame does not show (right and bottom) come from the good frames' median, not smeared
    # edge pixels: within ~7 grey levels of the part in place where replicated edges are ~28 off
    right_strip = np.abs(aligned[:, -6:].astype(float) - part()[:, -6:]).mean()
    bottom_strip = np.abs(aligned[-4:].astype(float) - part()[-4:]).mean()
    assert right_strip < 12 and bottom_strip < 12
    # a map that is high where the square landed in the aligned frame, moved back, peaks where the square was
    square_map = (aligned_marked[..., 0] >= 250).astype(np.float32)[None]
    restored = Registration.restore(square_map, poses[1:])[0]
    rows, cols = np.nonzero(restored > 0.5)
    assert rows.mean() == pytest.approx(127.5, abs=1.5) and cols.mean() == pytest.approx(67.5, abs=1.5)


def test_large_frames_are_registered_at_the_models_scale() -> None:
    frame = part(dx=8, dy=5, degrees=-3)
    (small,), _ = build_registration(good_parts(12, seed=0), max_side=120).align([cv2.resize(frame, (400, 400))])
    assert small.shape == (120, 120, 3)  # scaled down before the warp: the models see it at most this large anyway
    (full,), _ = _registration().align([frame])
    assert _centre_ncc(cv2.resize(full, (120, 120), interpolation=cv2.INTER_AREA), small) > 0.97  # the same pose


def test_an_unrecognisable_frame_is_left_as_it_came() -> None:
    registration = _registration()
    noise = np.random.default_rng(0).integers(0, 256, (PART, PART, 3), dtype=np.uint8)
    (aligned,), (pose,) = registration.align([noise])
    assert pose is None and aligned is noise


def _write(frames: list[np.ndarray], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"frame_{number:02d}.png" for number in range(len(frames))]
    for path, frame in zip(paths, frames, strict=True):
        cv2.imwrite(str(path), frame)
    return paths


def test_auto_registers_aligned_parts_but_not_textures(tmp_path: Path) -> None:
    parts = _write(good_parts(16, seed=1), tmp_path / "parts")
    rng = np.random.default_rng(2)
    brick = skimage.data.brick()
    crops = [brick[top : top + 96, left : left + 96] for top, left in rng.integers(0, brick.shape[0] - 96, (16, 2))]
    textures = _write([np.repeat(crop[..., None], 3, axis=2) for crop in crops], tmp_path / "textures")
    on = choose_registration(parts, "auto")
    assert on.registration is not None and on.description.startswith("auto: on")
    off = choose_registration(textures, "auto")
    assert off.registration is None and "no common layout" in off.description
    assert choose_registration(textures, "on").registration is not None  # forced
    assert choose_registration(parts, "off") == type(off)(None, "")
    few = choose_registration(parts[:5], "auto")
    assert few.registration is None and "only 5 readable good frames" in few.description
    assert choose_registration(parts[:5], "on").registration is not None  # asked for: built from what there is


def test_a_registered_model_forgives_a_part_off_its_fixture(tmp_path: Path) -> None:
    from models.artifact import load_scorer
    from models.fit import fit_scorer

    paths = _write(good_parts(16, seed=3), tmp_path / "good")
    scorers = {}
    for setting in ("off", "auto"):
        config = config_from_mapping(TINY | {"model": {**TINY["model"], "registration": setting}})
        scorers[setting] = fit_scorer(paths, config, progress=False, holdout_fraction=0.2)
    assert scorers["off"].registration is None and scorers["auto"].registration is not None
    assert (scorers["off"].model_settings.registration, scorers["auto"].model_settings.registration) == ("off", "on")
    assert "frames registered" in scorers["auto"].describe() and "registered" not in scorers["off"].describe()
    frames = [part(), part(dx=9, dy=-6, degrees=3)]
    off, registered = (scorers[key].score(frames).scores for key in ("off", "auto"))
    noise = np.random.default_rng(0).integers(0, 256, (PART, PART, 3), dtype=np.uint8)
    unregistered = scorers["auto"].score([*frames, noise]).unregistered
    assert unregistered is not None and unregistered.tolist() == [False, False, True]
    assert scorers["off"].score(frames).unregistered is None
    assert registered[1] < off[1]  # the part moved beyond shifting's reach scores as normal once registered
    assert registered[1] < 1.5 * registered[0] + 1.0  # and close to the part in place
    scorers["auto"].save(tmp_path / "model")
    reloaded = load_scorer(tmp_path / "model")
    assert reloaded.registration is not None and reloaded.registration.max_side == 2 * 96  # twice TINY's 96 px
    assert scorers["auto"].companions  # fused: the members' directories hold no copy of the registration
    assert [path.parent.name for path in (tmp_path / "model").rglob("registration.npz")] == ["model"]
    np.testing.assert_array_equal(reloaded.score(frames).scores, registered)
    assert reloaded.training.registration_choice.startswith("auto: on")


def twelve_bit(image: np.ndarray) -> np.ndarray:
    """An 8-bit picture as a Mono12 camera stores it: 0-4095 in 16 bits."""
    return np.round(image * (4095 / 255)).astype(np.uint16)


def test_12_bit_frames_are_registered_and_filled_on_their_own_scale() -> None:
    """The fill (what a moved frame does not show) is on a 12-bit frame's range, not 16 times too bright."""
    registration = _registration()
    frame = part(dx=8, dy=5, degrees=-3)
    (aligned8,), (pose8,) = registration.align([frame])
    (aligned12,), (pose12,) = registration.align([twelve_bit(frame)])
    assert pose8 is not None and pose12 is not None and np.abs(pose12 - pose8).max() < 0.05
    assert aligned12.dtype == np.uint16 and int(aligned12.max()) <= 4095
    assert np.abs(aligned12.astype(float) * (255 / 4095) - aligned8).mean() < 1.0


def _moved_exactly(registration: Registration, image: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """``image`` moved by a grid ``pose`` in floats (nothing rounded), what it does not show from the fill."""
    height, width = image.shape[:2]
    matrix = scaled(pose, width, height)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    moved_image = cv2.warpAffine(image.astype(np.float32), matrix, (width, height), flags=flags,
                                 borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    shown = cv2.warpAffine(np.ones((height, width), np.uint8), matrix, (width, height),
                           flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP).astype(bool)  # fmt: skip
    fill = cv2.resize(registration.fill, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return np.where(shown[..., None], moved_image, fill)


def test_16_bit_twins_are_registered_as_their_8_bit_picture_short_of_its_rounding() -> None:
    """A 12-bit or full-range 16-bit twin of an 8-bit frame gets the 8-bit frame's pose and, on the unit range, its
    pixels moved exactly (in floats, the fill on the twin's range); only the 8-bit frame is rounded to whole grey
    levels. That rounding is all that differs between the depths once registered (models/registration.py says what
    it does to scores)."""
    registration = _registration()
    frame = part(dx=8, dy=5, degrees=-3)
    (aligned8,), (pose8,) = registration.align([frame])
    assert pose8 is not None
    exact = _moved_exactly(registration, frame, pose8)
    rounding = np.abs(aligned8 - exact)
    assert rounding.max() < 0.51 and 0.2 < rounding.mean() < 0.3  # 8 bits: the exact move, rounded (measured 0.23)
    for twin, full in ((twelve_bit(frame), 4095), (frame.astype(np.uint16) * 257, 65535)):
        (aligned,), (pose,) = registration.align([twin])
        assert pose is not None and np.abs(pose - pose8).max() < 0.005  # grid px; measured 0.0006
        difference = np.abs(aligned * (255 / full) - exact)  # measured: max 0.17 and 0.13, mean 0.02 and 0.005
        assert aligned.dtype == np.uint16 and difference.max() < 0.25 and difference.mean() < 0.05


def test_registered_16_bit_twins_score_alike_and_their_defects_as_in_8_bits(demo_line: DemoLine) -> None:
    """A registered model fitted on 8-bit frames scores 12-bit and full-range 16-bit twins alike, and defective
    twins as their 8-bit pictures, failing as they do. Good twins are left out: on this noise-free line registered
    good frames agree within half a grey level, so the 8-bit frames' rounding (the previous test) moves their scores
    by 20-30% (models/registration.py), in either direction depending on the depth the model was fitted on."""
    from models.fit import fit_scorer

    config = config_from_mapping(TINY | {"model": {**TINY["model"], "registration": "on"}})
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.2)
    assert scorer.registration is not None and scorer.model_settings.intensity == "standardise"
    pictures = [read_image(path) for path in demo_line.test_images]
    defective = np.array(demo_line.test_labels) == 1
    eight = scorer.score(pictures)
    twelve = scorer.score([twelve_bit(picture) for picture in pictures])
    sixteen = scorer.score([picture.astype(np.uint16) * 257 for picture in pictures])
    for twins in (twelve, sixteen):
        assert twins.unregistered is not None and not twins.unregistered.any()
    np.testing.assert_allclose(sixteen.scores, twelve.scores, rtol=0.02)  # measured within 0.8%
    np.testing.assert_allclose(twelve.scores[defective], eight.scores[defective], rtol=0.03)  # measured 1.9%
    for result in (eight, twelve, sixteen):
        assert all(scorer.verdicts(result.scores[defective]))


def test_a_registration_fitted_on_12_bit_frames_equals_the_one_fitted_on_8_bit(tmp_path: Path) -> None:
    """Reference and fill are built on each frame's own range: 12-bit good parts give the 8-bit parts' ones."""
    from models.fit import fit_scorer

    parts = good_parts(16, seed=3)
    config = config_from_mapping(TINY | {"model": {**TINY["model"], "registration": "on"}})
    eight = fit_scorer(_write(parts, tmp_path / "good8"), config, progress=False, holdout_fraction=0.2)
    twelve = fit_scorer(_write([twelve_bit(image) for image in parts], tmp_path / "good12"), config, progress=False,
                        holdout_fraction=0.2)  # fmt: skip
    assert eight.registration is not None and twelve.registration is not None
    assert np.abs(twelve.registration.reference - eight.registration.reference).max() < 0.01
    assert np.abs(twelve.registration.fill.astype(int) - eight.registration.fill).max() <= 2
    result = twelve.score([twelve_bit(part()), twelve_bit(part(dx=9, dy=-6, degrees=3))])
    assert result.unregistered is not None and not result.unregistered.any() and np.isfinite(result.scores).all()


def test_pixels_no_good_frame_shows_are_filled_without_a_numpy_warning() -> None:
    # a few unaligned texture crops: some border pixels are outside every frame once moved into the reference's pose
    # (MTD's tiles did this when fitting on 10 images); they are filled from reflections, which is no cause to warn
    rng = np.random.default_rng(0)
    gravel = skimage.data.gravel()
    frames = [np.repeat(gravel[row : row + 160, col : col + 160, None], 3, axis=2)
              for row, col in rng.integers(0, 300, size=(4, 2))]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registration = build_registration(frames)
    assert np.isfinite(registration.reference).all() and registration.fill.shape[:2] == (FILL_SIDE, FILL_SIDE)


def test_what_an_inspection_mask_ignores_does_not_move_the_pose() -> None:
    """A label the part's pose does not move (stuck on its fixture, or its content differing part to part) pulls an
    unmasked pose towards itself; with the label's pixels ignored the part's own pose is found."""
    registration = _registration()
    frame = part(dx=6, dy=-4)
    frame[0:100, 80:200] = 250  # a bright label where the reference has coins, standing still
    frame[20:80, 100:180] = 10
    scale = SIDE / PART
    ignored = np.zeros((SIDE, SIDE), bool)
    ignored[: round(100 * scale) + 6, round(80 * scale) - 6 :] = True  # the label's grid pixels and a margin
    plain, _ = estimate_pose(registration.reference, _grid(frame))
    masked, response = estimate_pose(registration.reference, _grid(frame), ignored)
    assert masked[:, 2] == pytest.approx(np.array([6, -4]) * scale, abs=0.3)
    assert np.abs(plain[:, 2] - np.array([6, -4]) * scale).max() > 2.0  # without the mask it is pulled away
    assert response > 0.5
    reloaded = Registration(registration.reference, registration.fit_response, registration.fill, ignored=ignored)
    assert reloaded.poses([frame])[0] == pytest.approx(masked)
