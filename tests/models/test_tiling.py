from pathlib import Path

import numpy as np
import pytest
import torch

from models.images import read_image, read_mask
from models.scorer import Scorer, preprocess
from models.synthetic import DemoLine
from models.tiling import MAX_TILES, frame_tiles, split_by_frame, stitch_tiles, tile_count
from pipeline.config import Config


def test_frames_are_cut_into_near_square_pieces_that_cover_them() -> None:
    shapes = [(100, 100), (100, 149), (100, 150), (100, 260), (300, 100), (1, 0), (1, 5000)]
    assert [tile_count(h, w) for h, w in shapes] == [1, 1, 2, 3, 3, 1, MAX_TILES]
    wide = np.arange(100 * 260 * 3, dtype=np.int64).reshape(100, 260, 3)
    pieces = frame_tiles(wide)
    assert len(pieces) == 3 and all(0.67 <= p.shape[1] / p.shape[0] <= 1.5 for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), wide)
    tall = wide.transpose(1, 0, 2)
    np.testing.assert_array_equal(np.concatenate(frame_tiles(tall), axis=0), tall)


def test_piece_maps_are_stitched_back_in_frame_order() -> None:
    maps = torch.stack([torch.full((12, 12), float(value)) for value in [7, 0, 1, 2, 3, 4, 5]])
    stitched = stitch_tiles(maps, [(50, 50), (40, 120), (90, 30)])  # square, wide, tall
    assert stitched.shape == (3, 12, 12)
    assert torch.equal(stitched[0], maps[0])
    for piece in range(3):  # piece j fills the j-th third of the long side
        assert torch.equal(stitched[1][:, 4 * piece : 4 * piece + 4], torch.full((12, 4), float(piece)))
        assert torch.equal(stitched[2][4 * piece : 4 * piece + 4], torch.full((4, 12), float(piece + 3)))
    with pytest.raises(ValueError, match="7 tiles for frames that make 4"):
        split_by_frame(maps, [(40, 120), (50, 50)])


def test_a_frames_pieces_share_its_brightness_standardisation() -> None:
    wide = np.full((100, 300, 3), 60, np.uint8)
    wide[:, :100] = 200  # the left piece is bright: standardising it alone would erase that
    batch = preprocess([wide, wide[:, :100]], 32, "tile", "standardise")
    assert batch.shape == (4, 3, 32, 32)
    means = batch[:3].mean(dim=(1, 2, 3))
    assert float(means[0]) > float(means[1]) + 0.3 and torch.allclose(means[1], means[2])
    assert abs(float(batch[:3].mean()) - 0.449) < 0.01  # the frame as a whole has the standard mean


@pytest.fixture(scope="module")
def wide_line(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    """A tile-mode model fitted on wide frames made of two demo images side by side."""
    import cv2

    from models.fit import fit_scorer
    from pipeline.config import config_from_mapping
    from tests.models.conftest import TINY

    train = sorted(demo_line.train_dir.iterdir())
    out = tmp_path_factory.mktemp("wide")
    paths: list[Path] = []
    for position in range(len(train) - 1):
        path = out / f"wide_{position}.png"
        cv2.imwrite(str(path), np.concatenate([read_image(train[position]), read_image(train[position + 1])], axis=1))
        paths.append(path)
    config: Config = config_from_mapping({**TINY, "model": {**TINY["model"], "resize": "tile"}})
    return fit_scorer(paths, config, progress=False, holdout_fraction=0.2)


def test_tiled_model_finds_a_defect_in_its_piece_and_scores_one_value_per_frame(
    wide_line: Scorer, demo_line: DemoLine
) -> None:
    scorer = wide_line
    position = demo_line.test_labels.index(1)
    defect_path = demo_line.test_images[position]
    good = read_image(demo_line.test_images[demo_line.test_labels.index(0)])
    defect = read_image(defect_path)
    mask_path = demo_line.root / "ground_truth" / "defect" / f"{defect_path.stem}_mask.png"
    mask = read_mask(mask_path, (good.shape[1], good.shape[0]))
    frame = np.concatenate([good, defect], axis=1)  # defect in the right piece
    batch = scorer.score([frame, np.concatenate([good, good], axis=1), good])
    assert batch.scores.shape == (3,) and batch.maps.shape == (3, 96, 96)
    frame_mask = np.concatenate([np.zeros_like(mask), mask], axis=1)
    import cv2

    small_mask = cv2.resize(frame_mask.astype(np.uint8), (96, 96), interpolation=cv2.INTER_NEAREST) > 0
    assert batch.maps[0][small_mask].mean() > batch.maps[0][~small_mask].mean() + 1.0
    assert batch.scores[0] > batch.scores[1]
    assert scorer.threshold is not None and batch.scores[1] <= scorer.threshold.value * 1.5


def test_training_batches_count_pieces_for_progress_and_frames_for_the_summary(tmp_path: Path) -> None:
    import cv2

    from models.fit import TrainingImages

    paths = []
    for position, (height, width) in enumerate([(40, 40), (40, 120), (90, 30), (40, 70)]):
        paths.append(tmp_path / f"frame_{position}.png")
        cv2.imwrite(str(paths[-1]), np.full((height, width), 100 + position, np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    images = TrainingImages([*paths, tmp_path / "broken.png"], 32, 3, resize="tile")
    assert images.images == 1 + 3 + 3 + 2
    assert sum(batch.shape[0] for batch in images) == images.images
    assert images.frames == 4 and len(images.skipped) == 1
    assert TrainingImages(paths, 32, 3).images == 4


def test_a_method_with_its_own_image_score_scores_a_tiled_frame_as_its_worst_piece(
    demo_line: DemoLine, tmp_path: Path
) -> None:
    import cv2

    from models.fit import fit_scorer
    from pipeline.config import config_from_mapping
    from tests.models.conftest import TINY

    train = [read_image(path) for path in sorted(demo_line.train_dir.iterdir())]
    paths = []
    for position in range(len(train) - 1):
        paths.append(tmp_path / f"wide_{position}.png")
        cv2.imwrite(str(paths[-1]), np.concatenate([train[position], train[position + 1]], axis=1))
    # raw intensities and no registration: a piece scored alone is then preprocessed exactly as inside its frame
    overrides = {"model": {**TINY["model"], "method": "gaussian", "resize": "tile", "intensity": "raw",
                           "registration": "off"},
                 "scoring": TINY["scoring"], "fusion": {"members": []}}  # fmt: skip
    scorer = fit_scorer(paths, config_from_mapping(overrides), progress=False, holdout_fraction=0.0)
    good = read_image(demo_line.test_images[demo_line.test_labels.index(0)])
    defect = read_image(demo_line.test_images[demo_line.test_labels.index(1)])
    frame_scores = scorer.score([np.concatenate([good, defect], axis=1), np.concatenate([defect, good], axis=1)])
    piece_scores = scorer.score([good, defect]).scores
    np.testing.assert_allclose(frame_scores.scores, [piece_scores.max()] * 2, rtol=1e-5)
    assert frame_scores.maps[0][:, 48:].max() > frame_scores.maps[0][:, :48].max()  # the defect's half is hotter
