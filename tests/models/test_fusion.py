"""Fusion ([fusion] members): companions fitted beside the main method, scores and maps averaged in z units."""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.artifact import load_scorer
from models.backbones import images_per_pass
from models.errors import ArtifactError
from models.fit import fit_scorer, holdout_split
from models.images import read_image
from models.scorer import Scorer
from models.synthetic import DemoLine
from models.threshold import false_reject_threshold
from pipeline.config import Config, config_from_mapping
from tests.models.conftest import TINY

# the recommended member: PaDiM over PatchCore's two blocks and the one between them
PADIM = {"method": "padim", "model": {"aggregation_kernel": 1, "layers": ["blocks.2", "blocks.3", "blocks.4"]},
         "scoring": {"image_score": "max"}}  # fmt: skip
# a third of the fit images kept out, so the 14-image demo line leaves a few for position statistics
FUSED = TINY | {"scoring": TINY["scoring"] | {"normalisation_fraction": 0.3}, "fusion": {"members": [PADIM]}}


@pytest.fixture(scope="module")
def fused_config() -> Config:
    return config_from_mapping(FUSED)


@pytest.fixture(scope="module")
def fused(demo_line: DemoLine, fused_config: Config) -> Scorer:
    return fit_scorer(sorted(demo_line.train_dir.iterdir()), fused_config, progress=False, holdout_fraction=0.2)


def _alone(scorer: Scorer) -> Scorer:
    return Scorer(scorer.method, scorer.model_settings, scorer.scoring, scorer.training,
                  position_stats=scorer.position_stats, registration=scorer.registration)  # fmt: skip


def test_fit_gives_each_member_its_own_settings_and_statistics(fused: Scorer) -> None:
    (padim,) = fused.companions
    assert fused.method.name == "patchcore" and padim.method.name == "padim"
    assert padim.model_settings.aggregation_kernel == 1 and padim.scoring.image_score == "max"
    assert padim.method.extractor.backbone.layers == ("blocks.2", "blocks.3", "blocks.4")  # type: ignore[attr-defined]
    assert fused.scoring.image_score == "topk" and fused.model_settings.aggregation_kernel == 3
    assert fused.position_stats is not None and padim.position_stats is not None
    assert not np.array_equal(fused.position_stats.mean, padim.position_stats.mean)
    assert fused.describe().startswith("patchcore (") and " + padim (PaDiM" in fused.describe()


def test_fused_scores_and_maps_are_the_members_mean(fused: Scorer, demo_line: DemoLine) -> None:
    images = [read_image(p) for p in demo_line.test_images]
    batch, own, padim = fused.score(images), _alone(fused).score(images), fused.companions[0].score(images)
    np.testing.assert_allclose(batch.scores, (own.scores + padim.scores) / 2, rtol=1e-6)
    np.testing.assert_allclose(batch.maps, (own.maps + padim.maps) / 2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(own.scores, padim.scores)  # two different opinions were averaged
    relative = fused.with_scoring(fused.scoring.model_copy(update={"map_baseline": "median"})).score(images)
    np.testing.assert_allclose(relative.scores, batch.scores, rtol=1e-6)
    medians = np.median(batch.maps.reshape(len(images), -1), axis=1)
    np.testing.assert_allclose(relative.maps, batch.maps - medians[:, None, None], rtol=1e-5, atol=1e-5)


def test_members_share_one_backbone_pass(fused: Scorer, demo_line: DemoLine) -> None:
    images = [read_image(p) for p in demo_line.test_images[:4]]
    runs: list[str] = []
    hooks = [s.method.extractor.backbone.network.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda *_, name=s.method.name: runs.append(name)) for s in (fused, *fused.companions)]  # fmt: skip
    try:
        fused.score(images)
        assert runs == ["patchcore"]
        fused.with_scoring(fused.scoring.model_copy(update={"shift_pixels": 2})).score(images, shift_every_frame=True)
        size = fused.model_settings.image_size
        chunks = math.ceil(len(images) * 5 / images_per_pass(size, size))  # 5 views a frame, in chunks of the network
        assert runs == ["patchcore"] * (1 + chunks)  # shifted views too: one pass for both members
    finally:
        for hook in hooks:
            hook.remove()


def test_threshold_is_set_on_fused_scores(fused: Scorer, demo_line: DemoLine, fused_config: Config) -> None:
    _, holdout = holdout_split(sorted(demo_line.train_dir.iterdir()), 0.2)
    scores = fused.score([read_image(p) for p in holdout]).scores
    expected = false_reject_threshold(scores, fused_config.threshold.false_reject_rate)
    assert fused.threshold is not None and fused.threshold.value == pytest.approx(expected.value, rel=1e-6)


def test_shift_settings_reach_the_companions(fused: Scorer, demo_line: DemoLine) -> None:
    shifted = fused.with_scoring(fused.scoring.model_copy(update={"shift_pixels": 2, "image_score": "max"}))
    assert shifted.companions[0].scoring.shift_pixels == 2 and len(shifted.companions[0].offsets) == 5
    assert shifted.companions[0].scoring.image_score == "max" and shifted.scoring.image_score == "max"
    assert shifted.score([read_image(demo_line.test_images[0])]).maps.shape == (1, 96, 96)


def test_mismatched_companion_is_refused(fused: Scorer) -> None:
    other = fused.companions[0].with_scoring(fused.companions[0].scoring.model_copy(update={"shift_pixels": 2}))
    with pytest.raises(ValueError, match="cannot fuse padim with patchcore"):
        Scorer(fused.method, fused.model_settings, fused.scoring, fused.training, companions=[other])


def test_saved_fusion_reloads_into_a_new_scorer(fused: Scorer, demo_line: DemoLine, tmp_path: Path) -> None:
    fused.save(tmp_path / "model")
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert [entry["dir"] for entry in manifest["fusion"]] == ["fusion-1-padim"]
    reloaded = load_scorer(tmp_path / "model", device="cpu")
    images = [read_image(p) for p in demo_line.test_images]
    first, second = fused.score(images), reloaded.score(images)
    assert np.array_equal(first.scores, second.scores) and np.array_equal(first.maps, second.maps)
    assert reloaded.threshold == fused.threshold and reloaded.companions[0].threshold is None


def test_damaged_or_swapped_member_is_refused(fused: Scorer, tmp_path: Path) -> None:
    fused.save(tmp_path / "model")
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "model", damaged)
    with (damaged / "fusion-1-padim" / "padim.npz").open("r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match=r"padim\.npz does not match its sha256"):
        load_scorer(damaged, device="cpu")
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "model", swapped)
    member = fused.companions[0]
    member.with_scoring(member.scoring.model_copy(update={"top_k": 3})).save(swapped / "fusion-1-padim")
    with pytest.raises(ArtifactError, match="not the fusion member this model was saved with"):
        load_scorer(swapped, device="cpu")
    shutil.rmtree(swapped / "fusion-1-padim")
    with pytest.raises(ArtifactError, match="fusion member directory 'fusion-1-padim' is missing"):
        load_scorer(swapped, device="cpu")


def test_too_few_images_for_statistics_fit_the_main_method_alone(
    demo_line: DemoLine, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_from_mapping(TINY | {"fusion": {"members": [PADIM]}})  # 0.1 of ~11 images: none kept out
    with caplog.at_level(logging.WARNING):
        scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.2)
    assert scorer.companions == () and scorer.position_stats is None
    assert "fitted patchcore alone" in caplog.text


@pytest.fixture(scope="module")
def default_fusion(demo_line: DemoLine) -> Scorer:
    """The default members (no [fusion] section) on the 96 px demo model."""
    config = config_from_mapping(TINY | {"scoring": FUSED["scoring"]})
    return fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.2)


def test_default_adds_a_coarser_pair_whose_maps_are_resized_before_the_mean(
    default_fusion: Scorer, demo_line: DemoLine
) -> None:
    from models.scorer import resize_maps

    fitted_scorer = default_fusion  # PaDiM at 96 px, then PaDiM at 64 px
    assert [(c.method.name, c.image_size) for c in fitted_scorer.companions] == [("padim", 96), ("padim", 64)]
    assert " + padim at 64 px (" in fitted_scorer.describe()
    images = [read_image(p) for p in demo_line.test_images]
    batch = fitted_scorer.score(images)
    members = [_alone(fitted_scorer).score(images)] + [c.score(images) for c in fitted_scorer.companions]
    assert members[2].maps.shape == (len(images), 64, 64) and batch.maps.shape == (len(images), 96, 96)
    np.testing.assert_allclose(batch.scores, np.mean([m.scores for m in members], axis=0), rtol=1e-5)
    expected = np.mean([resize_maps(m.maps, 96) for m in members], axis=0)
    np.testing.assert_allclose(batch.maps, expected, rtol=1e-5, atol=1e-5)


def test_one_backbone_pass_per_input_size(default_fusion: Scorer, demo_line: DemoLine) -> None:
    fitted_scorer = default_fusion
    images = [read_image(p) for p in demo_line.test_images[:4]]
    sizes: list[int] = []
    members = (fitted_scorer, *fitted_scorer.companions)
    hooks = [m.method.extractor.backbone.network.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda _module, inputs: sizes.append(inputs[0].shape[-1])) for m in members]  # fmt: skip
    try:
        fitted_scorer.score(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes == [96, 64]


def test_saved_coarser_members_reload_with_their_own_size(default_fusion: Scorer, demo_line: DemoLine,
                                                          tmp_path: Path) -> None:  # fmt: skip
    default_fusion.save(tmp_path / "model")
    reloaded = load_scorer(tmp_path / "model")
    assert [c.image_size for c in reloaded.companions] == [96, 64]
    images = [read_image(p) for p in demo_line.test_images[:4]]
    np.testing.assert_array_equal(reloaded.score(images).scores, default_fusion.score(images).scores)
