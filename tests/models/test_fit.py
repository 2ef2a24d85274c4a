"""Fitting on few good images (models/fit.py): the held-out slices never leave a threshold from one image or fewer
than 2 images to fit, and the user is told what the model lacks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from models.fit import fit_scorer, holdout_split
from models.synthetic import DemoLine
from pipeline.config import Config


def test_a_threshold_slice_of_one_image_is_fitted_on_and_the_model_says_it_has_no_threshold(
    demo_line: DemoLine, tiny_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    paths = sorted(demo_line.train_dir.iterdir())[:3]
    assert len(holdout_split(paths, 0.1)[1]) == 1  # these names put one of three in the 10% threshold slice
    with caplog.at_level(logging.WARNING, logger="models.fit"):
        scorer = fit_scorer(paths, tiny_config, progress=False, holdout_fraction=0.1)
    # a threshold at one good image's score fails about half of all good parts: none is set, the image is fitted
    assert scorer.threshold is None
    statistics = scorer.position_stats.images if scorer.position_stats else 0
    assert scorer.training.images + statistics == 3
    assert "3 good images are few: on MTD's validation split the default model's image AUROC" in caplog.text
    assert "3 good images: 1 would be kept out for a first threshold" in caplog.text
    assert "the model has no threshold: run `lineinspect calibrate` on at least 20 good images" in caplog.text


def test_two_good_images_fit_with_nothing_kept_out(demo_line: DemoLine, tiny_config: Config,
                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    # one image kept out for position statistics would leave one to fit, too few for PaDiM's covariances: it stays in
    paths = sorted(demo_line.train_dir.iterdir())[:2]
    with caplog.at_level(logging.WARNING, logger="models.fit"):
        scorer = fit_scorer(paths, tiny_config, progress=False, holdout_fraction=0.1)
    assert scorer.training.images == 2 and scorer.position_stats is None and scorer.threshold is None
    assert "maps stay unnormalised" in caplog.text


def test_a_threshold_slice_of_two_images_sets_a_threshold_and_warns_it_is_unreliable(
    demo_line: DemoLine, tiny_config: Config, tmp_path: Path
) -> None:
    paths = sorted(demo_line.train_dir.iterdir())[:5]
    assert len(holdout_split(paths, 0.1)[1]) == 2
    with pytest.warns(UserWarning, match="From fewer than 20 good images such a threshold is unreliable"):
        scorer = fit_scorer(paths, tiny_config, progress=False, holdout_fraction=0.1)
    assert scorer.threshold is not None and scorer.threshold.good_images == 2


def test_unreadable_files_are_dropped_before_the_slices_are_cut(
    demo_line: DemoLine, tiny_config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # three good images and three empty files (a copy that failed): counted as images, the empty files put one good
    # image in a threshold slice it could not fill and left one readable image to fit, and PaDiM failed on it
    folder = tmp_path / "good"
    folder.mkdir()
    for source, name in zip(sorted(demo_line.train_dir.iterdir()), ("good0", "good1", "good5"), strict=False):
        (folder / f"{name}.png").write_bytes(source.read_bytes())
    for number in range(3):
        (folder / f"junk{number}.png").write_bytes(b"")
    paths = sorted(folder.iterdir())
    assert [path.name for path in holdout_split(paths, 0.1)[1]] == ["good5.png", "junk2.png"]  # the trap, as it was
    with caplog.at_level(logging.WARNING, logger="models.fit"):
        scorer = fit_scorer(paths, tiny_config, progress=False, holdout_fraction=0.1)
    statistics = scorer.position_stats.images if scorer.position_stats else 0
    assert scorer.training.images + statistics == 3 and scorer.threshold is None  # every good image fitted
    assert sorted(reason.split(":")[0] for reason in scorer.training.skipped) == [
        str(folder / f"junk{number}.png") for number in range(3)
    ]
    assert "3 good images are few" in caplog.text  # the readable ones, not 6
    assert caplog.text.count("junk0.png: empty image data") == 1  # warned once, not once per fusion member


def test_fitting_on_no_readable_image_names_the_files(tmp_path: Path, tiny_config: Config) -> None:
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    paths[0].write_bytes(b"")
    paths[1].write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"no readable training image among 2 files:\n  .*a.png.*\n  .*b.jpg"):
        fit_scorer(paths, tiny_config, progress=False)


def test_a_slice_far_over_its_share_is_cut_to_it() -> None:
    # a camera's names f00.tif to f19.tif put 7 of 20 in the 10% threshold slice: 35% of a small set kept out of the
    # bank where 10% was asked. Over twice the share (and 2 or more expected) takes the lowest hashes, as under half
    names = [Path(f"f{number:02d}.tif") for number in range(20)]
    assert sum(int(hashlib.sha1(name.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.1 for name in names) == 7
    fit, held = holdout_split(names, 0.1)
    assert len(held) == 2 and len(fit) == 18 and set(fit).isdisjoint(held)
    assert len(holdout_split(names[:14], 0.1)[1]) == 3  # 1.4 expected: too few to force (fit's other rules apply)
