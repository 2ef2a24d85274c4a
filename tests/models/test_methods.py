"""The contract every method in the registry keeps: fit on good images, detect defects, reload identically.

Methods are listed in ``models.methods.METHOD_CLASSES``; a new method is covered here as soon as it is registered.
``FAST`` holds each method's settings for this tiny demo line (bounded training budgets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.artifact import load_scorer, read_manifest
from models.evaluation import auroc
from models.images import read_image
from models.methods import METHOD_CLASSES, method_class
from models.synthetic import DemoLine
from pipeline.config import config_from_mapping
from tests.models.conftest import TINY

FAST: dict[str, dict[str, Any]] = {
    "patchcore": {},
    "patchsvdd": {
        "patchsvdd": {"patch_size": 32, "epochs": 3, "batch_size": 8, "max_train_seconds": 20, "bank_rows": 2000}
    },
    "gaussian": {"gaussian": {"init_images": 4}},
    "padim": {},
    "cfa": {"cfa": {"epochs": 3, "batch_images": 4, "max_train_seconds": 30}},
    "npad": {"npad": {"channels": 48, "train_radius": 1, "kmeans_sample": 1024}},
}


@pytest.fixture(scope="module", params=sorted(METHOD_CLASSES))
def fitted(request: pytest.FixtureRequest, demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory):
    from models.fit import fit_scorer

    name = request.param
    settings = {section: dict(values) for section, values in TINY.items()}
    settings["model"]["method"] = name
    for section, values in FAST.get(name, {}).items():
        settings.setdefault(section, {}).update(values)
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config_from_mapping(settings), progress=False,
                        holdout_fraction=0.2)  # fmt: skip
    model_dir = tmp_path_factory.mktemp(f"model-{name}")
    scorer.save(model_dir)
    return name, scorer, model_dir


def test_every_registered_method_has_fast_test_settings() -> None:
    assert sorted(FAST) == sorted(METHOD_CLASSES)


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'svm'; known methods: .*patchcore"):
        method_class("svm")


def test_method_separates_synthetic_defects_from_good_parts(fitted, demo_line: DemoLine) -> None:
    name, scorer, _ = fitted
    images = [read_image(path) for path in demo_line.test_images]
    batch = scorer.score(images)
    assert batch.scores.shape == (len(images),) and batch.maps.shape == (len(images), 96, 96)
    assert np.isfinite(batch.scores).all() and np.isfinite(batch.maps).all()
    assert auroc(np.array(demo_line.test_labels), batch.scores) >= 0.8, name
    assert scorer.threshold is not None


def test_method_reloads_into_a_new_scorer_with_identical_scores(fitted, demo_line: DemoLine) -> None:
    name, scorer, model_dir = fitted
    images = [read_image(path) for path in demo_line.test_images[:4]]
    reloaded = load_scorer(model_dir, device="cpu")
    assert reloaded.method is not scorer.method and reloaded.method.name == name
    assert read_manifest(model_dir)["method"]["name"] == name
    first, second = scorer.score(images), reloaded.score(images)
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.maps, second.maps)


def test_method_scores_shifted_views_and_batches_consistently(fitted, demo_line: DemoLine) -> None:
    _, scorer, _ = fitted
    images = [read_image(path) for path in demo_line.test_images[:3]]
    together = scorer.score(images).scores
    alone = np.concatenate([scorer.score([image]).scores for image in images])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    shifted = scorer.with_scoring(scorer.scoring.model_copy(update={"shift_pixels": 2})).score(images)
    assert shifted.scores.shape == (3,) and np.isfinite(shifted.maps).all()


def test_model_files_are_listed_in_the_manifest(fitted) -> None:
    _, _, model_dir = fitted
    listed = set(read_manifest(Path(model_dir))["files"])
    on_disk = {path.name for path in Path(model_dir).iterdir()} - {"manifest.json"}
    assert listed == on_disk and listed
