from pathlib import Path

import numpy as np
import pytest

from models.images import read_image
from models.methods.patchcore import PatchCoreMethod
from models.scorer import Scorer, gaussian_blur
from models.synthetic import DemoLine


def _images(demo_line: DemoLine) -> tuple[list[np.ndarray], np.ndarray]:
    return [read_image(p) for p in demo_line.test_images], np.array(demo_line.test_labels)


def test_batch_gives_one_score_and_one_full_size_map_per_image(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    images, _ = _images(demo_line)
    batch = fitted_scorer.score(images[:5])
    assert batch.scores.shape == (5,) and batch.maps.shape == (5, 96, 96)
    assert batch.scores.dtype == np.float32 and np.isfinite(batch.maps).all()
    assert batch.timings.backbone_s > 0 and batch.timings.search_s > 0


def test_a_batch_costs_one_backbone_call_and_one_search(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    images, _ = _images(demo_line)
    scorer = fitted_scorer.with_scoring(fitted_scorer.scoring.model_copy(update={"shift_pixels": 2}))
    calls = {"backbone": 0, "search": 0}
    method = scorer.method
    assert isinstance(method, PatchCoreMethod)
    hook = method.extractor.backbone.register_forward_hook(
        lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)
    )
    original_search = method.index.search

    def counting_search(*args, **kwargs):
        calls["search"] += 1
        return original_search(*args, **kwargs)

    method.index.search = counting_search  # type: ignore[method-assign]
    try:
        scorer.score(images[:4])
    finally:
        hook.remove()
        del method.index.search
    assert calls == {"backbone": 1, "search": 1}


def test_batched_scores_equal_one_by_one(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    images, _ = _images(demo_line)
    together = fitted_scorer.score(images[:4]).scores
    alone = np.array([fitted_scorer.score([image]).scores[0] for image in images[:4]])
    np.testing.assert_allclose(together, alone, rtol=1e-4)


def test_defects_score_higher_than_good_parts(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    images, labels = _images(demo_line)
    scores = fitted_scorer.score(images).scores
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert np.median(scores[labels == 1]) > scores[labels == 0].max() * 0.9


def test_defect_map_peaks_on_the_defect(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    from models.images import read_mask

    position = demo_line.test_labels.index(1)
    path = demo_line.test_images[position]
    batch = fitted_scorer.score([read_image(path)])
    mask = read_mask(demo_line.root / "ground_truth" / "defect" / f"{path.stem}_mask.png", (96, 96))
    assert batch.maps[0][mask].mean() > batch.maps[0][~mask].mean()


@pytest.mark.parametrize("image_score", ["reweighted", "softmin"])
def test_alternative_image_scores_rank_defects_higher(fitted_scorer: Scorer, demo_line: DemoLine,
                                                      image_score: str) -> None:  # fmt: skip
    images, labels = _images(demo_line)
    settings = fitted_scorer.scoring.model_copy(update={"image_score": image_score, "neighbors": 3})
    scores = fitted_scorer.with_scoring(settings).score(images).scores
    assert scores.shape == (len(images),)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_any_image_format_is_accepted(fitted_scorer: Scorer) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (120, 200), dtype=np.uint8)
    rgba = rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)
    deep = rng.integers(0, 65535, (90, 90), dtype=np.uint16)
    assert fitted_scorer.score([gray, rgba, deep]).scores.shape == (3,)


def test_empty_batch_and_missing_threshold_are_errors(fitted_scorer: Scorer) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        fitted_scorer.score([])
    with pytest.raises(RuntimeError, match="calibrate"):
        uncalibrated = fitted_scorer.with_scoring(fitted_scorer.scoring)
        uncalibrated.threshold = None
        uncalibrated.verdicts(np.array([1.0]))


def test_gaussian_blur_preserves_mass_and_spreads_peaks() -> None:
    import torch

    maps = torch.zeros(1, 41, 41)
    maps[0, 20, 20] = 1.0
    blurred = gaussian_blur(maps, 4.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-4
    assert float(blurred.max()) < 0.02 and int(blurred.argmax()) == 20 * 41 + 20


def test_gaussian_blur_is_a_reflect_padded_2d_convolution() -> None:
    import torch
    import torch.nn.functional as F

    from models.scorer import gaussian_kernel

    maps = torch.rand(3, 50, 37, generator=torch.Generator().manual_seed(0))
    kernel = gaussian_kernel(2.0)
    radius = kernel.numel() // 2
    padded = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")  # edge pixel not repeated
    expected = F.conv2d(padded, torch.outer(kernel, kernel)[None, None])[:, 0]
    torch.testing.assert_close(gaussian_blur(maps, 2.0), expected, rtol=1e-5, atol=1e-6)


def test_pad_keeps_the_aspect_and_fills_with_the_mean_colour() -> None:
    from models.scorer import content_box, preprocess

    assert content_box(100, 300, 96, "pad") == (32, 0, 32, 96)
    assert content_box(300, 100, 96, "pad") == (0, 32, 96, 32)
    assert content_box(100, 300, 96, "stretch") == (0, 0, 96, 96)
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :150] = 200  # left half bright, right half dark: mean 100
    batch = preprocess([wide], 96, "pad")[0]
    assert batch.shape == (3, 96, 96)
    assert np.allclose(batch[:, :32].numpy(), 100 / 255, atol=1 / 255)  # padding above
    assert np.allclose(batch[:, 32:64, :40].numpy(), 200 / 255, atol=1 / 255)  # content keeps its layout
    assert np.allclose(batch[:, 32:64, 56:].numpy(), 0.0, atol=1 / 255)


def test_heatmaps_are_relative_to_their_frame_and_scores_are_not(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    images, _ = _images(demo_line)
    assert fitted_scorer.scoring.map_baseline == "none"  # the default
    absolute = fitted_scorer
    relative = fitted_scorer.with_scoring(fitted_scorer.scoring.model_copy(update={"map_baseline": "median"}))
    relative_batch, absolute_batch = relative.score(images), absolute.score(images)
    np.testing.assert_array_equal(relative_batch.scores, absolute_batch.scores)
    medians = np.median(relative_batch.maps.reshape(len(images), -1), axis=1)
    assert np.abs(medians).max() < 1e-5  # every heatmap's background sits at 0
    assert not np.allclose(np.median(absolute_batch.maps.reshape(len(images), -1), axis=1), 0.0, atol=1e-2)
    # a frame of another texture altogether: its heatmap is flattened to its own background, its score is not
    other = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)  # white noise
    batch = relative.score([other, *images])
    assert batch.scores[0] > batch.scores[1:].max()
    assert fitted_scorer.threshold is not None and batch.scores[0] > fitted_scorer.threshold.value  # still fails


def test_standardise_removes_exposure_but_keeps_the_pattern() -> None:
    import torch

    from models.scorer import STANDARD_MEAN, STANDARD_STD, preprocess

    rng = np.random.default_rng(0)
    part = rng.integers(60, 140, (80, 120), dtype=np.uint8)
    brighter = np.clip(part.astype(np.float32) * 1.5 + 20, 0, 255).astype(np.uint8)  # more gain and offset
    raw = preprocess([part, brighter], 64)
    assert float((raw[0] - raw[1]).abs().mean()) > 0.1  # the backbone would see two different parts
    standard = preprocess([part, brighter], 64, intensity="standardise")
    assert float((standard[0] - standard[1]).abs().max()) < 0.03  # the same part (up to uint8 rounding)
    assert abs(float(standard[0].mean()) - STANDARD_MEAN) < 1e-4 and abs(float(standard[0].std()) - STANDARD_STD) < 1e-3
    defect = part.copy()
    defect[30:40, 50:60] = 255
    moved = preprocess([part, defect], 64, intensity="standardise")
    diff = (moved[0] - moved[1]).abs().amax(dim=0)
    assert int(diff.argmax()) // 64 in range(22, 34)  # the difference stays where the defect is
    flat = preprocess([np.full((40, 40), 90, np.uint8)], 32, intensity="standardise")
    assert torch.isfinite(flat).all() and torch.allclose(flat, torch.full_like(flat, STANDARD_MEAN))
    wide = np.zeros((100, 300), np.uint8)
    wide[:, :150] = 200
    padded = preprocess([wide], 96, "pad", "standardise")[0]
    content = padded[:, 32:64]
    assert abs(float(content.mean()) - STANDARD_MEAN) < 0.01 and abs(float(content.std()) - STANDARD_STD) < 0.01


def test_pad_maps_cover_the_frame_and_peak_on_its_defect(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    import cv2

    from models.synthetic import add_synthetic_defect

    settings = fitted_scorer.model_settings.model_copy(update={"resize": "pad"})
    padded = Scorer(fitted_scorer.method, settings, fitted_scorer.scoring, fitted_scorer.training,
                    registration=fitted_scorer.registration)  # fmt: skip
    part = read_image(demo_line.train_dir / "part_0000.png")
    wide = np.concatenate([part, part[:, ::-1]], axis=1)  # 160 x 320: stretching would halve its width
    defective, mask = add_synthetic_defect(wide, np.random.default_rng(0), kind="blob")
    batch = padded.score([wide, defective])
    assert batch.maps.shape == (2, 96, 96)
    small_mask = cv2.resize(mask.astype(np.uint8), (96, 96), interpolation=cv2.INTER_NEAREST) > 0
    difference = batch.maps[1] - batch.maps[0]
    near_mask = cv2.dilate(small_mask.astype(np.uint8), np.ones((33, 33), np.uint8)) > 0  # +-1 cell of 16 px
    assert near_mask.flat[int(difference.argmax())]  # the map peaks at the defect, where it lies in the frame
    # 2x, not more: a defect this large (on a 160 x 320 frame) also moves the frame's standardised intensities
    assert difference[small_mask].mean() > 2 * max(difference[~small_mask].mean(), 1e-6)


def test_pad_batches_of_mixed_shapes_score_as_one_by_one(fitted_scorer: Scorer, demo_line: DemoLine) -> None:
    settings = fitted_scorer.model_settings.model_copy(update={"resize": "pad"})
    padded = Scorer(fitted_scorer.method, settings, fitted_scorer.scoring, fitted_scorer.training,
                    registration=fitted_scorer.registration)  # fmt: skip
    part = read_image(demo_line.test_images[0])
    frames = [part[:, :60], part, np.concatenate([part, part], axis=1)]  # tall, square, wide
    together = padded.score(frames)
    for position, frame in enumerate(frames):
        alone = padded.score([frame])
        np.testing.assert_allclose(together.maps[position], alone.maps[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(together.scores[position], alone.scores[0], rtol=1e-4)


def test_12_bit_camera_data_in_16_bits_scores_like_the_same_picture_in_8(fitted_scorer: Scorer, demo_line: DemoLine,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    """Mono12 cameras often store 0-4095 in 16-bit PNGs. Scaled straight to 8 bits that is 16 grey levels; the
    scorer keeps every level, so (frames standardised, as this line's are) it scores as the 8-bit picture does."""
    import cv2

    assert fitted_scorer.model_settings.intensity == "standardise"
    pictures = [read_image(path) for path in demo_line.test_images[:4]]
    twelve_bit = []
    for position, picture in enumerate(pictures):
        path = tmp_path / f"frame{position}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.round(picture * (4095 / 255)).astype(np.uint16), cv2.COLOR_RGB2BGR))
        twelve_bit.append(read_image(path, keep_depth=True))
    assert twelve_bit[0].dtype == np.uint16 and int(twelve_bit[0].max()) <= 4095
    eight = fitted_scorer.score(pictures).scores
    twelve = fitted_scorer.score(twelve_bit).scores
    np.testing.assert_allclose(twelve, eight, rtol=0.02, atol=0.05)
    quantised = fitted_scorer.score([read_image(tmp_path / f"frame{n}.png") for n in range(4)]).scores  # 8-bit read
    assert np.abs(quantised - eight).max() > 10 * np.abs(twelve - eight).max()
