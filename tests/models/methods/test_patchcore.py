"""PatchCore's scoring against its paper, written out plainly: nearest-bank distances as the map, and the image score
of Eq. 7, s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) s*, with b = 9 and N_b(m*) the b
bank entries nearest m* (m* itself among them). The backbone is replaced by fixed features (a pure unit test)."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from models.features import PatchFeatureExtractor
from models.index import NearestNeighbourIndex
from models.memory_bank import MemoryBank
from models.methods.patchcore import REWEIGHT_NEIGHBOURS, PatchCoreMethod
from pipeline.config import BankSettings, IndexSettings, ScoringSettings


class FixedFeatures(nn.Module):
    """Stands in for the backbone: whatever the views, the given features ``(V, C, h, w)``."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.register_buffer("device_probe", torch.zeros(1))
        self.features = features

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.features


class MissesTheQueryItself(NearestNeighbourIndex):
    """An approximate index's way to fail a bank row's own search: the entry itself is not returned (HNSW did so
    for 277 of 6,272 rows of a random bank of 152 channels), the next k nearest are."""

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if k == 1:
            return super().search(queries, k)
        distances, indices = super().search(queries, k + 1)
        return distances[:, 1:], indices[:, 1:]


def _paper_scores(features: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ``(V, h, w)`` and Eq. 7's image scores ``(V,)`` by brute force in float64."""
    _, channels, height, width = features.shape
    bank64 = bank.astype(np.float64)
    maps, scores = [], []
    for view in features.astype(np.float64):
        patches = view.reshape(channels, -1).T  # (h * w, C), row-major over (h, w)
        distances = np.linalg.norm(patches[:, None] - bank64[None], axis=2)  # (h * w, rows)
        patch_scores = distances.min(axis=1)
        worst = int(patch_scores.argmax())  # m_test
        nearest = int(distances[worst].argmin())  # m*
        around = np.argsort(np.linalg.norm(bank64 - bank64[nearest], axis=1), kind="stable")[:REWEIGHT_NEIGHBOURS]
        assert nearest in around  # N_b(m*) holds m* itself (distance 0)
        to_support = np.linalg.norm(bank64[around] - patches[worst], axis=1)
        weight = 1 - np.exp(distances[worst, nearest]) / np.exp(to_support).sum()
        maps.append(patch_scores.reshape(height, width))
        scores.append(weight * patch_scores[worst])
    return np.stack(maps), np.array(scores)


def _method(features: np.ndarray, bank: np.ndarray, index: NearestNeighbourIndex) -> PatchCoreMethod:
    extractor = cast(PatchFeatureExtractor, FixedFeatures(torch.from_numpy(features)))
    return PatchCoreMethod(extractor, MemoryBank(bank, "coreset"), index, BankSettings(), IndexSettings(), 16)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    bank = rng.normal(0, 1, (300, 6)).astype(np.float32)
    # good-looking patches near bank entries, and in each view one patch somewhat off: distances of a few units, so
    # the softmax weights are far from 0 and 1
    features = bank[rng.integers(0, 300, 4 * 5 * 5)] + rng.normal(0, 0.1, (4 * 5 * 5, 6)).astype(np.float32)
    features = features.reshape(4, 5, 5, 6).transpose(0, 3, 1, 2).copy()
    features[:, :, 2, 3] += rng.normal(0, 1.5, (4, 6)).astype(np.float32)
    return np.ascontiguousarray(features), bank


@pytest.mark.parametrize("index_kind", ["flat", "misses_the_query_itself"])
def test_reweighted_image_score_is_the_papers_eq_7(index_kind: str) -> None:
    features, bank = _data()
    flat = NearestNeighbourIndex.build(bank, "flat")
    index = MissesTheQueryItself(flat.cpu_index, "flat") if index_kind == "misses_the_query_itself" else flat
    output = _method(features, bank, index).score_views(torch.zeros(4, 3, 16, 16), ScoringSettings(
        image_score="reweighted"))  # fmt: skip
    expected_maps, expected_scores = _paper_scores(features, bank)
    np.testing.assert_allclose(output.patch_maps.numpy(), expected_maps, rtol=1e-4, atol=1e-4)
    assert output.view_scores is not None
    weights = expected_scores / expected_maps.reshape(4, -1).max(axis=1)
    assert (weights > 0.5).all() and (weights < 0.99).all()  # not degenerate (1 - 1/9 when all b are as near)
    np.testing.assert_allclose(output.view_scores.numpy(), expected_scores, rtol=1e-4, atol=1e-5)


def test_reweighting_with_a_bank_smaller_than_b_uses_every_entry() -> None:
    features, bank = _data()
    small = np.ascontiguousarray(bank[:5])
    output = _method(features, small, NearestNeighbourIndex.build(small, "flat")).score_views(
        torch.zeros(4, 3, 16, 16), ScoringSettings(image_score="reweighted"))  # fmt: skip
    assert output.view_scores is not None
    np.testing.assert_allclose(output.view_scores.numpy(), _paper_scores(features, small)[1], rtol=1e-4, atol=1e-5)
