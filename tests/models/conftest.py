"""Small real data for model tests: a demo line from scikit-image's brick texture and a model fitted on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.scorer import Scorer
from models.synthetic import DemoLine, make_demo_line
from pipeline.config import Config, config_from_mapping

# unshifted and unregistered: tests that shift or register say so
TINY: dict[str, dict[str, Any]] = {
    "model": {"image_size": 96, "registration": "off"},
    "bank": {"compression_ratio": 2, "init_images": 4},
    "scoring": {"batch_size": 4, "shift_pixels": 0},
}


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return config_from_mapping(TINY)


@pytest.fixture(scope="session")
def demo_line(tmp_path_factory: pytest.TempPathFactory) -> DemoLine:
    return make_demo_line(tmp_path_factory.mktemp("demo"), n_train=14, n_test_good=6, n_test_defect=6,
                          image_size=160, seed=1)  # fmt: skip


@pytest.fixture(scope="session")
def fitted_scorer(demo_line: DemoLine, tiny_config: Config) -> Scorer:
    from models.fit import fit_scorer

    return fit_scorer(sorted(demo_line.train_dir.iterdir()), tiny_config, progress=False, holdout_fraction=0.2)


@pytest.fixture(scope="session")
def saved_model(fitted_scorer: Scorer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("model")
    fitted_scorer.save(model_dir)
    return model_dir
