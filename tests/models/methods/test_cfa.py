"""CFA's own ideas: the coupled-hypersphere loss, the softmin certainty, a distance-preserving initial descriptor,
training that lowers the loss within a bounded budget, and a saved head that must match its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import load_scorer
from models.errors import ArtifactError
from models.fit import TrainingImages
from models.memory_bank import MemoryBank
from models.methods.cfa import (
    CFAMethod,
    PatchDescriptor,
    build_bank,
    cache_features,
    certainty_scores,
    coupled_hypersphere_loss,
    dataset_loss,
    train_descriptor,
)
from models.methods.patchcore import build_extractor
from models.scorer import Scorer, TrainingSummary
from models.synthetic import DemoLine
from pipeline.config import CFASettings, Config, config_from_mapping
from tests.models.conftest import TINY

# Three bank entries on one axis, 10 apart (squared distances between them: 100, 400).
ENTRIES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])


def _nearest_first(descriptor: torch.Tensor) -> torch.Tensor:
    order = torch.linalg.vector_norm(ENTRIES - descriptor, dim=1).argsort()
    return ENTRIES[order][None]  # (1, 3, 2)


def test_loss_is_zero_on_a_bank_entry_and_positive_far_from_it() -> None:
    on_entry = ENTRIES[1:2]
    terms = coupled_hypersphere_loss(on_entry, _nearest_first(on_entry[0]), attract=1, radius=1e-5, margin=0.1)
    assert float(terms.total) == 0.0
    far = torch.tensor([[13.0, 4.0]])  # squared distance 25 to the nearest entry
    terms = coupled_hypersphere_loss(far, _nearest_first(far[0]), attract=1, radius=1e-5, margin=0.1)
    assert float(terms.attraction) == pytest.approx(25.0, rel=1e-4) and float(terms.repulsion) == 0.0


def test_attraction_averages_the_k_nearest_and_spares_patches_inside_the_radius() -> None:
    descriptor = torch.tensor([[10.0, 0.5]])  # squared distances 0.25, 100.25, 100.25
    entries = _nearest_first(descriptor[0])
    within = coupled_hypersphere_loss(descriptor, entries, attract=1, radius=1.0, margin=0.0)
    assert float(within.attraction) == 0.0  # 0.25 < r^2 = 1
    three = coupled_hypersphere_loss(descriptor, entries, attract=3, radius=1.0, margin=0.0)
    assert float(three.attraction) == pytest.approx((0.0 + 99.25 + 99.25) / 3, rel=1e-5)


def test_repulsion_pushes_only_hard_negatives_inside_radius_plus_margin() -> None:
    # Entries 0.2 apart: the second (a hard negative for K = 1) lies at squared distance 0.04 < r^2 + alpha.
    close = torch.tensor([[0.0, 0.0], [0.2, 0.0]])
    descriptor = torch.tensor([[0.0, 0.0]], requires_grad=True)
    terms = coupled_hypersphere_loss(descriptor, close[None], attract=1, radius=0.0, margin=0.1)
    assert float(terms.repulsion.detach()) == pytest.approx(0.1 - 0.04, rel=1e-5)
    terms.repulsion.backward()
    assert descriptor.grad is not None and float(descriptor.grad[0, 0]) > 0  # descent moves away from the negative
    spread = torch.tensor([[0.0, 0.0], [0.4, 0.0]])  # squared distance 0.16 > 0.1: already outside the margin
    assert float(coupled_hypersphere_loss(descriptor.detach(), spread[None], 1, 0.0, 0.1).repulsion) == 0.0
    assert float(coupled_hypersphere_loss(descriptor.detach(), close[None], 2, 0.0, 0.1).repulsion) == 0.0  # J = 0


def test_certainty_is_the_softmin_weight_of_the_nearest_entry() -> None:
    squared = torch.tensor([[4.0, 4.0, 4.0], [1.0, 30.0, 40.0]])
    scores = certainty_scores(squared)
    assert float(scores[0]) == pytest.approx(4.0 / 3)  # equally near entries: certainty 1/K
    assert float(scores[1]) == pytest.approx(1.0, rel=1e-6)  # a clear nearest entry keeps its distance


def test_untrained_descriptor_keeps_distances_and_ignores_coordinates() -> None:
    features = torch.randn(2, 24, 5, 5, generator=torch.Generator().manual_seed(0))
    head = PatchDescriptor(24, 24, coord_conv=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = torch.cdist(features.flatten(2).mT, features.flatten(2).mT)
        descriptors = head(features)
        after = torch.cdist(descriptors.flatten(2).mT, descriptors.flatten(2).mT)
    assert descriptors.shape == (2, 24, 5, 5)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert PatchDescriptor(24, 12, coord_conv=False)(features).shape == (2, 12, 5, 5)
    with pytest.raises(ValueError, match="descriptor channels"):
        PatchDescriptor(24, 48, coord_conv=False)


@pytest.fixture(scope="module")
def demo_features(demo_line: DemoLine) -> tuple[Config, torch.Tensor]:
    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "cfa"}})
    extractor = build_extractor(config.model, torch.device("cpu"))
    images = TrainingImages(sorted(demo_line.train_dir.iterdir()), 96, 4)
    return config, cache_features(extractor, images, progress=False)


def test_training_lowers_the_loss_on_the_demo_line_with_a_fixed_bank(demo_features) -> None:
    config, features = demo_features
    settings = CFASettings(epochs=8, batch_images=4)
    head = PatchDescriptor(features.shape[1], features.shape[1], False, torch.Generator().manual_seed(0)).eval()
    bank = build_bank(head, features, config.bank)
    kept = bank.features.copy()
    before = dataset_loss(head, features, bank, settings)
    record = train_descriptor(head, features, bank, settings, progress=False)
    after = dataset_loss(head, features, bank, settings)
    assert record.epochs_finished == 8 and record.stopped_by == "epochs" and len(record.epoch_losses) == 8
    assert float(after.total) < 0.95 * float(before.total)  # measured: 159 -> 136 (-14%) in 32 steps
    assert record.epoch_losses[-1] < record.epoch_losses[0]
    np.testing.assert_array_equal(bank.features, kept)  # the bank is the fixed target, never moved by training


def test_training_stops_at_the_wall_time_cap(demo_features) -> None:
    config, features = demo_features
    settings = CFASettings(epochs=1000, batch_images=1, max_train_seconds=0.01)
    head = PatchDescriptor(features.shape[1], features.shape[1], False).eval()
    record = train_descriptor(head, features, build_bank(head, features, config.bank), settings, progress=False)
    assert record.stopped_by == "time" and record.epochs_finished < 1000 and record.steps >= 1


def test_bank_is_the_compressed_kind_whatever_patchcore_uses(demo_features) -> None:
    config, features = demo_features
    head = PatchDescriptor(features.shape[1], features.shape[1], False)
    bank = build_bank(head, features, config.bank.model_copy(update={"kind": "coreset"}))
    assert bank.kind == "compressed"


def test_bank_lives_in_the_descriptor_space(demo_features) -> None:
    config, features = demo_features
    head = PatchDescriptor(features.shape[1], features.shape[1] // 2, False)
    bank = build_bank(head, features, config.bank)
    assert isinstance(bank, MemoryBank) and bank.channels == features.shape[1] // 2


@pytest.fixture(scope="module")
def saved_cfa(demo_line: DemoLine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.fit import fit_scorer

    config = config_from_mapping(TINY | {"model": {"image_size": 96, "method": "cfa"},
                                         "cfa": {"epochs": 2, "batch_images": 4, "reduction": 2}})  # fmt: skip
    scorer = fit_scorer(sorted(demo_line.train_dir.iterdir()), config, progress=False, holdout_fraction=0.0)
    assert isinstance(scorer.method, CFAMethod)
    assert "-> 76" in scorer.method.describe() and "2 epochs" in scorer.method.describe()
    model_dir = tmp_path_factory.mktemp("cfa-model")
    scorer.save(model_dir)
    return model_dir


def _rewrite_manifest_section(model_dir: Path, key: str, value: object) -> None:
    """Edit the method section and re-seal the manifest, as a model from another version would look."""
    from models.artifact import _write_manifest

    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["method"][key] = value
    _write_manifest(model_dir, manifest)


def test_saved_model_records_training_and_reloads_into_a_new_scorer(saved_cfa: Path) -> None:
    manifest = json.loads((saved_cfa / "manifest.json").read_text())
    section = manifest["method"]
    assert section["name"] == "cfa" and section["descriptor"] == {"in_channels": 152, "out_channels": 76,
                                                                  "coord_conv": False}  # fmt: skip
    assert section["training"]["epochs_finished"] == 2 and len(section["training"]["epoch_losses"]) == 2
    state = torch.load(saved_cfa / "descriptor.pt", weights_only=True)
    assert set(state) == {"projection.weight", "projection.bias"}
    scorer = load_scorer(saved_cfa, device="cpu")
    assert isinstance(scorer, Scorer) and isinstance(scorer.training, TrainingSummary)


def test_load_rejects_a_head_that_does_not_match_the_manifest(saved_cfa: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(saved_cfa, model_dir)
    _rewrite_manifest_section(model_dir, "descriptor", {"in_channels": 152, "out_channels": 152, "coord_conv": False})
    with pytest.raises(ArtifactError, match="size mismatch"):
        load_scorer(model_dir, device="cpu")
    shutil.rmtree(model_dir)
    shutil.copytree(saved_cfa, model_dir)
    _rewrite_manifest_section(model_dir, "descriptor", {"in_channels": 152, "out_channels": 76, "coord_conv": True})
    with pytest.raises(ArtifactError, match="does not fit the descriptor"):
        load_scorer(model_dir, device="cpu")
