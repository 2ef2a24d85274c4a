"""Per-position normalisation: the statistics themselves, and fit / score / save / load with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_scorer
from models.errors import ArtifactError
from models.fit import fit_scorer, holdout_split
from models.images import read_image
from models.normalisation import STATS_FILE, PositionStats, PositionStatsBuilder
from models.synthetic import DemoLine
from pipeline.config import Config, config_from_mapping
from tests.models.conftest import TINY


def _noisy_border_maps(count: int, seed: int = 0) -> torch.Tensor:
    """Good maps (count, 16, 16): quiet everywhere (std 0.1) except a noisy left border column (std 2)."""
    generator = torch.Generator().manual_seed(seed)
    maps = 1.0 + 0.1 * torch.randn(count, 16, 16, generator=generator)
    maps[:, :, 0] = 1.0 + 2.0 * torch.randn(count, 16, generator=generator)
    return maps


def test_without_prior_the_statistics_are_the_per_pixel_mean_and_std() -> None:
    maps = _noisy_border_maps(50)
    stats = PositionStats.from_maps(maps, prior_images=0)
    assert torch.allclose(stats.mean, maps.mean(0), atol=1e-5)
    assert torch.allclose(stats.std, maps.std(0, correction=0), atol=1e-5)
    assert stats.images == 50 and stats.image_size == 16


def test_statistics_streamed_in_batches_equal_those_of_all_maps_at_once() -> None:
    maps = _noisy_border_maps(30)
    builder = PositionStatsBuilder()
    for start in range(0, 30, 8):
        builder.add(maps[start : start + 8])
    streamed, at_once = builder.finish(prior_images=8), PositionStats.from_maps(maps, prior_images=8)
    assert builder.count == 30
    assert torch.allclose(streamed.mean, at_once.mean) and torch.allclose(streamed.std, at_once.std)
    with pytest.raises(ValueError, match="after maps of size"):
        builder.add(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="no maps"):
        PositionStatsBuilder().finish(prior_images=8)


def test_prior_shrinks_few_images_towards_the_image_wide_statistics() -> None:
    maps = _noisy_border_maps(4)
    raw, shrunk = PositionStats.from_maps(maps, 0), PositionStats.from_maps(maps, 100)
    global_std = float(maps.std(correction=0))
    assert float((shrunk.std - global_std).abs().max()) < float((raw.std - global_std).abs().max())
    assert float(shrunk.std.std()) < 0.2 * float(raw.std.std())


def test_the_same_excess_counts_more_where_good_parts_are_quiet() -> None:
    stats = PositionStats.from_maps(_noisy_border_maps(200), prior_images=8)
    defect = torch.ones(1, 16, 16)
    defect[0, 5, 0] += 1.5  # on the noisy border
    defect[0, 5, 8] += 1.5  # in the quiet middle
    z = stats.apply(defect)[0]
    assert z[5, 8] > 5 * z[5, 0]
    assert z[5, 8] > 8  # 1.5 / 0.1 std, roughly
    assert abs(float(stats.apply(_noisy_border_maps(200, seed=1)).mean())) < 0.1  # good maps: z centred on 0


def test_a_constant_position_does_not_divide_by_zero() -> None:
    maps = _noisy_border_maps(10)
    maps[:, 3, 3] = 7.0
    z = PositionStats.from_maps(maps, prior_images=0).apply(maps)
    assert torch.isfinite(z).all()


def test_identical_good_maps_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Copies of one image (or blank frames) leave no spread to divide by: every other frame scores enormous."""
    with caplog.at_level("WARNING", logger="models.normalisation"):
        PositionStats.from_maps(_noisy_border_maps(10), prior_images=0)
        assert caplog.records == []  # a few constant pixels are fine
        PositionStats.from_maps(torch.ones(10, 16, 16) * 3.0, prior_images=0)
    assert "give the same anomaly map at 100% of pixels" in caplog.text


def test_statistics_round_trip_and_wrong_files_are_refused(tmp_path: Path) -> None:
    stats = PositionStats.from_maps(_noisy_border_maps(20), prior_images=8)
    assert stats.save(tmp_path) == STATS_FILE
    loaded = PositionStats.load(tmp_path, stats.images, 16)
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.std, stats.std)
    with pytest.raises(ArtifactError, match="position statistics"):
        PositionStats.load(tmp_path, stats.images, 32)  # another image size
    np.savez(tmp_path / STATS_FILE, mean=np.zeros((16, 16), np.float32), std=np.zeros((16, 16), np.float32))
    with pytest.raises(ArtifactError, match="std > 0"):
        PositionStats.load(tmp_path, stats.images, 16)
    (tmp_path / STATS_FILE).write_bytes(b"not an npz file")
    with pytest.raises(ArtifactError, match="unreadable"):
        PositionStats.load(tmp_path, stats.images, 16)
    with pytest.raises(ValueError, match="cannot use"):
        stats.apply(torch.zeros(1, 8, 8))


def _config(normalise: bool) -> Config:
    scoring = TINY["scoring"] | {"normalise_positions": normalise, "normalisation_fraction": 0.3}
    return config_from_mapping(TINY | {"scoring": scoring})


def test_fit_keeps_a_slice_out_for_the_statistics_and_the_model_carries_them(demo_line: DemoLine,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    paths = sorted(demo_line.train_dir.iterdir())
    scorer = fit_scorer(paths, _config(True), progress=False, holdout_fraction=0.0)
    kept_out = holdout_split(paths, 0.3, salt="position-stats:")[1]
    assert scorer.position_stats is not None and scorer.position_stats.images == len(kept_out) > 0
    assert scorer.training.images == len(paths) - len(kept_out)

    images = [read_image(path) for path in demo_line.test_images]
    scored = scorer.score(images)
    raw = scorer.with_scoring(scorer.scoring.model_copy(update={"normalise_positions": False})).score(images)
    assert not np.allclose(scored.maps, raw.maps)
    labels = np.array(demo_line.test_labels)
    assert scored.scores[labels == 1].min() > scored.scores[labels == 0].max()

    scorer.save(tmp_path / "model")
    assert (tmp_path / "model" / STATS_FILE).is_file()
    reloaded = load_scorer(tmp_path / "model")
    np.testing.assert_array_equal(reloaded.score(images).scores, scored.scores)
    np.testing.assert_array_equal(reloaded.score(images).maps, scored.maps)


def test_turned_off_nothing_is_kept_out_or_saved(demo_line: DemoLine, tmp_path: Path) -> None:
    paths = sorted(demo_line.train_dir.iterdir())
    scorer = fit_scorer(paths, _config(False), progress=False, holdout_fraction=0.0)
    assert scorer.position_stats is None and scorer.training.images == len(paths)
    scorer.save(tmp_path / "model")
    assert not (tmp_path / "model" / STATS_FILE).exists()
    assert load_scorer(tmp_path / "model").position_stats is None


def test_holdout_slices_depend_on_each_name_alone_but_small_sets_still_get_one() -> None:
    many = [Path(f"frame_{n:05d}.png") for n in range(2000)]
    fit, held = holdout_split(many, 0.1, salt="position-stats:")
    assert 150 < len(held) < 250 and set(fit).isdisjoint(held) and len(fit) + len(held) == 2000
    assert holdout_split([*many, Path("new.png")], 0.1, salt="position-stats:")[1][: len(held)] == held
    # 64 names whose hashes put none below 10% after the first slice (the demo line's): the lowest 6 are taken
    names = holdout_split([Path(f"part_{n:04d}.png") for n in range(64)], 0.1)[0]
    fit, held = holdout_split(names, 0.1, salt="position-stats:")
    assert len(held) == round(0.1 * len(names)) == 6 and len(fit) == len(names) - 6
    assert holdout_split(names[:12], 0.1, salt="position-stats:")[1] == []  # 1 expected: too few to force
