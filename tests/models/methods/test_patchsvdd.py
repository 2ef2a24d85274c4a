"""Patch SVDD's own ideas: true relative-position labels, a hierarchical encoder that sees all four quadrants and
whose dense pass equals per-patch encoding, training that lowers the loss, and a zero score for a training patch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.errors import ArtifactError
from models.fit import TrainingImages
from models.methods.patchsvdd import (
    POSITION_OFFSETS,
    PatchSVDDMethod,
    PatchSVDDTrainer,
    crop,
    jittered,
    patch_sizes,
    sample_position_pairs,
    spread_to_cells,
    strided_patches,
)
from models.methods.patchsvdd_nets import HierarchicalEncoder, PatchEncoders
from models.synthetic import DemoLine
from pipeline.config import PatchSVDDSettings, config_from_mapping


@pytest.mark.parametrize("patch_size", [16, 32, 64])
def test_position_labels_name_the_neighbours_true_direction_for_all_8_positions(patch_size: int) -> None:
    rng = np.random.default_rng(0)
    image_size = 2 * patch_size + 8
    anchors, neighbours, labels = sample_position_pairs(rng, 4000, image_size, patch_size)
    assert set(labels.tolist()) == set(range(8))
    offsets = neighbours - anchors
    for label, (row_direction, column_direction) in enumerate(POSITION_OFFSETS):
        chosen = offsets[labels == label]
        assert (np.sign(chosen) == [row_direction, column_direction]).all(), label
        moving = np.abs(chosen[:, [row_direction != 0, column_direction != 0]])
        assert (moving >= 3 * patch_size // 4).all() and (moving < patch_size).all()
    for positions in (anchors, neighbours):
        assert positions.min() >= 0 and positions.max() <= image_size - patch_size


def test_crops_come_from_the_sampled_positions_and_jitter_never_stays_put() -> None:
    rows, columns = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    image = torch.stack([rows, columns, rows]).to(torch.uint8)[None]  # pixel values are their coordinates
    rng = np.random.default_rng(1)
    anchors, neighbours, _ = sample_position_pairs(rng, 50, 64, 16)
    patches = crop(image, np.zeros(50, int), neighbours, 16)
    top_left = (patches[:, :2, 0, 0] * 255).round().long().numpy()
    np.testing.assert_array_equal(top_left, neighbours)
    moved = jittered(rng, anchors, 64, 16) - anchors
    assert (np.abs(moved) <= 1).all() and np.abs(moved).sum(axis=1).min() >= 1


def test_hierarchical_encoder_output_depends_on_all_four_quadrants() -> None:
    torch.manual_seed(0)
    encoders = PatchEncoders((32, 64), 64).eval()
    top = encoders.encoder(64)
    assert isinstance(top, HierarchicalEncoder)
    patch = torch.rand(1, 3, 64, 64) - 0.5
    with torch.no_grad():
        reference = top(patch)
        for row, column in ((0, 0), (0, 32), (32, 0), (32, 32)):
            changed = patch.clone()
            changed[..., row : row + 32, column : column + 32] = torch.rand(3, 32, 32) - 0.5
            assert (top(changed) - reference).abs().max() > 1e-3, (row, column)
        # and nothing outside the patch: the dense pass over an image equals encoding each crop alone
        image = torch.rand(1, 3, 128, 128) - 0.5
        dense = encoders.dense(image)
        for size, full in zip((32, 64), dense, strict=True):
            for i, j in ((0, 0), (3, 17), (full.shape[-1] - 1, 5)):
                alone = encoders.embed_patches(image[..., 2 * i : 2 * i + size, 2 * j : 2 * j + size], size)
                torch.testing.assert_close(alone[0], full[0, :, i, j], rtol=1e-4, atol=1e-5)


def test_training_lowers_the_loss_on_the_demo_line(demo_line: DemoLine) -> None:
    settings = PatchSVDDSettings(patch_size=32, batch_size=8, learning_rate=1e-3, svdd_weight=1.0)
    images = torch.cat(list(TrainingImages(sorted(demo_line.train_dir.iterdir()), 96, 8)))
    images = images.mul(255).round().to(torch.uint8)
    torch.manual_seed(0)
    encoders = PatchEncoders(patch_sizes(settings), settings.embedding_dim)
    encoders.channel_mean.copy_(images.float().mean(dim=(0, 2, 3)) / 255)
    trainer = PatchSVDDTrainer(encoders, settings, 96, seed=0)
    held_out = np.arange(images.shape[0]).repeat(4)

    def fixed_loss() -> float:  # the same pairs before and after training
        trainer.rng = np.random.default_rng(123)
        with torch.no_grad():
            return float(trainer.total(trainer.losses(images, held_out)))

    before = fixed_loss()
    optimiser = torch.optim.Adam(trainer.parameters(), lr=settings.learning_rate)
    trainer.rng = np.random.default_rng(0)
    for _ in range(12):
        loss = trainer.total(trainer.losses(images, trainer.rng.choice(images.shape[0], settings.batch_size)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = fixed_loss()
    assert after < 0.95 * before, (before, after)


@pytest.fixture(scope="module")
def untrained(demo_line: DemoLine) -> tuple[PatchSVDDMethod, torch.Tensor]:
    config = config_from_mapping({"model": {"image_size": 96, "method": "patchsvdd"},
                                  "patchsvdd": {"patch_size": 32, "epochs": 0, "bank_rows": 100_000}})  # fmt: skip
    batches = TrainingImages(sorted(demo_line.train_dir.iterdir())[:4], 96, 4)
    return PatchSVDDMethod.fit(batches, config, torch.device("cpu"), progress=False), next(iter(batches))


def test_a_patch_equal_to_a_training_patch_scores_zero(untrained) -> None:
    method, training_images = untrained
    assert method.training.steps == 0
    maps = method.score_views(training_images, config_from_mapping({}).scoring).patch_maps
    assert maps.shape == (4, 12, 12)
    assert float(maps.abs().max()) < 1e-6  # every patch at the bank stride is in the bank (bank_rows > patches)
    shifted = torch.roll(training_images, shifts=(3, 5), dims=(2, 3))  # off the bank's 8-px lattice
    assert float(method.score_views(shifted, config_from_mapping({}).scoring).patch_maps.max()) > 1e-3


def test_bank_rows_are_the_strided_training_patches(untrained) -> None:
    method, training_images = untrained
    with torch.no_grad():
        dense = method.encoders.dense(method.encoders.standardise(training_images))
    smallest = strided_patches(dense[0], 8)
    assert smallest.shape[-1] == (96 - 16) // 8 + 1
    rows = smallest.permute(0, 2, 3, 1).reshape(-1, smallest.shape[1]).numpy()
    assert method.banks[16].shape == rows.shape
    np.testing.assert_allclose(np.sort(method.banks[16], axis=0), np.sort(rows, axis=0), atol=1e-6)


def test_patch_scores_spread_evenly_over_the_cells_they_cover() -> None:
    scores = torch.zeros(1, 3, 3)
    scores[0, 1, 1] = 6.0
    cells = spread_to_cells(scores, 16, 8)  # each patch covers 2 x 2 cells
    assert cells.shape == (1, 4, 4)
    assert cells[0, 1, 1] == pytest.approx(6.0 / 4) and cells[0, 0, 0] == 0.0 and cells[0, 2, 2] == pytest.approx(1.5)


def test_load_rejects_a_model_fitted_at_another_image_size(untrained, tmp_path) -> None:
    method, _ = untrained
    section = method.save(tmp_path)
    other = config_from_mapping({"model": {"image_size": 128, "method": "patchsvdd"}}).model
    with pytest.raises(ArtifactError, match="fitted at 96 px"):
        PatchSVDDMethod.load(tmp_path, section, other, torch.device("cpu"))
    same = config_from_mapping({"model": {"image_size": 96, "method": "patchsvdd"}}).model
    torch.save({"unexpected": torch.zeros(1)}, tmp_path / "encoders.pt")
    with pytest.raises(ArtifactError, match="cannot rebuild"):
        PatchSVDDMethod.load(tmp_path, section, same, torch.device("cpu"))


def test_standardised_tails_are_clamped_not_wrapped_in_the_uint8_training_copy() -> None:
    from models.methods.patchsvdd import _load_uint8

    class Batches:
        images = 1

        def __iter__(self) -> Iterator[torch.Tensor]:
            yield torch.tensor([-0.2, 0.5, 1.3]).view(1, 3, 1, 1).expand(1, 3, 2, 2)

    loaded = _load_uint8(Batches(), progress=False)
    assert loaded.dtype == torch.uint8 and loaded[0, :, 0, 0].tolist() == [0, 128, 255]
