"""Fitting on few good images (models/fit.py): the held-out slices never leave a threshold from one image or fewer
than 2 images to fit, and the user is told what the model lacks."""

from __future__ import annotations

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
