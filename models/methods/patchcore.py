"""PatchCore-style kNN over a patch-feature memory bank (the default method).

Fit: every good image -> locally aware patch features ``(C, h, w)`` (``models.features``) -> a memory bank
(``models.memory_bank``): by default the greedy k-center coreset of a fixed-size uniform sample of all patches
(rows fixed by a ratio of one image's ``h * w`` patches, so size and fit cost do not grow with the training set);
or the CFA-style compressed bank (k-means init + running-mean/EMA updates, same fixed size); or PatchCore's
coreset over all patches -> faiss index (``models.index``).

Score: views ``(V, 3, S, S)`` -> one backbone call -> ``(V * h * w, C)`` patches -> one index search ->
nearest distances ``(V * h * w, k)`` -> patch maps ``(V, h, w)``; optionally times CFA's softmin certainty over
the k nearest entries, or, for ``image_score = "reweighted"``, PatchCore's re-weighted maximum as the view score.

Files: ``bank.npy`` (rows, C) float32 and ``index.faiss``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from models.backbones import load_backbone
from models.errors import ArtifactError, BackboneError
from models.features import PatchFeatureExtractor, embed_on_device, flatten_patches
from models.index import IndexError_, NearestNeighbourIndex
from models.memory_bank import (
    CompressedBankBuilder,
    MemoryBank,
    MemoryBankError,
    PatchReservoir,
    bounded_coreset,
    coreset_select,
)
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from pipeline.config import BankSettings, Config, IndexSettings, ModelSettings, ScoringSettings

BANK_FILE = "bank.npy"
INDEX_FILE = "index.faiss"
REWEIGHT_NEIGHBOURS = 9


def build_extractor(model: ModelSettings, device: torch.device) -> PatchFeatureExtractor:
    backbone = load_backbone(model.backbone, model.layers, model.weights_path)
    extractor = PatchFeatureExtractor(backbone, model.aggregation_kernel, model.feature_dim)
    return extractor.to(device)


def load_extractor(
    model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device, consumer: str, channels: int
) -> PatchFeatureExtractor:
    """The saved layers' extractor, checked to give the recorded feature shape and the ``channels`` that
    ``consumer`` (e.g. "bank has 152 channels") expects; ArtifactError naming the mismatch otherwise."""
    try:
        backbone = load_backbone(model.backbone, tuple(section["layers"]), model.weights_path)
    except (KeyError, TypeError, BackboneError) as error:
        msg = f"{model_dir}: {error}"
        raise ArtifactError(msg) from None
    extractor = PatchFeatureExtractor(backbone, model.aggregation_kernel, model.feature_dim).to(device)
    got, grid_h, grid_w = extractor.output_shape(model.image_size)
    recorded = section["features"]
    if got != recorded["channels"] or [grid_h, grid_w] != recorded["grid"] or got != channels:
        msg = (
            f"{model_dir}: backbone {model.backbone} {section['layers']} gives features "
            f"{got}x{grid_h}x{grid_w}, the model was fitted on {recorded['channels']}x{recorded['grid']} "
            f"({consumer}): backbone or weights mismatch"
        )
        raise ArtifactError(msg)
    return extractor


def embed(extractor: PatchFeatureExtractor, views: torch.Tensor) -> torch.Tensor:
    """``(V, 3, S, S)`` -> patch features ``(V, C, h, w)`` float32 on the CPU (fp16 autocast on CUDA)."""
    return embed_on_device(extractor, views).cpu()


class PatchCoreMethod(AnomalyMethod):
    name: ClassVar[str] = "patchcore"

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        bank: MemoryBank,
        index: NearestNeighbourIndex,
        bank_settings: BankSettings,
        index_settings: IndexSettings,
        image_size: int,
    ) -> None:
        if bank.channels != index.dimension:
            msg = f"bank has {bank.channels} channels but the index expects {index.dimension}"
            raise ValueError(msg)
        self.extractor = extractor
        self.bank = bank
        self.index = index
        self.bank_settings = bank_settings
        self.index_settings = index_settings
        self.image_size = image_size

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> PatchCoreMethod:
        extractor = build_extractor(config.model, device)
        _, grid_h, grid_w = extractor.output_shape(config.model.image_size)
        settings = config.bank
        builder = CompressedBankBuilder(
            grid_h * grid_w, settings.compression_ratio, settings.ema_momentum, settings.kmeans_iterations,
            settings.init_images, settings.seed,
        )  # fmt: skip
        reservoir = PatchReservoir(settings.pool_patches, settings.seed)
        collected: list[np.ndarray] = []
        bar = tqdm(total=batches.images, desc="fit: embedding good images", unit="img", disable=not progress)
        for batch in batches:
            for image_features in embed(extractor, batch):
                patches = flatten_patches(image_features[None]).numpy()
                if settings.kind == "compressed":
                    builder.add_image(patches)
                elif settings.kind == "bounded_coreset":
                    reservoir.add(patches)
                else:
                    collected.append(patches)
            bar.update(batch.shape[0])
        bar.close()
        if settings.kind == "compressed":
            bank = builder.finish()
        elif settings.kind == "bounded_coreset":
            rows = max(1, round(settings.compression_ratio * grid_h * grid_w))
            coreset_bar = tqdm(total=rows, desc="fit: greedy coreset", unit="row", disable=not progress, miniters=256)
            bank = bounded_coreset(reservoir, rows, settings.coreset_projection_dim, settings.seed,
                                   on_step=lambda _step: coreset_bar.update(1))  # fmt: skip
            coreset_bar.close()
        else:
            bank = _coreset_bank(np.concatenate(collected), settings, progress)
        use_gpu = config.index.use_gpu == "auto" and device.type == "cuda"
        index = NearestNeighbourIndex.build(
            bank.features, config.index.kind, use_gpu, config.index.ivf_lists, config.index.ivf_probe,
            config.index.hnsw_neighbors,
        )  # fmt: skip
        return cls(extractor, bank, index, config.bank, config.index, config.model.image_size)

    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        features = embed(self.extractor, views)
        view_count, _, grid_h, grid_w = features.shape
        embedded = time.perf_counter()
        patches = flatten_patches(features).numpy()
        distances, neighbours = self.index.search(patches, scoring.neighbors)
        patch_scores = torch.from_numpy(distances[:, 0].copy())
        if scoring.image_score == "softmin":
            patch_scores = patch_scores * torch.softmax(-torch.from_numpy(distances), dim=1)[:, 0]
        view_scores = None
        if scoring.image_score == "reweighted":
            view_scores = self._reweighted_scores(patches, patch_scores, neighbours[:, 0], view_count)
        searched = time.perf_counter()
        maps = patch_scores.view(view_count, grid_h, grid_w)
        return MethodOutput(maps, view_scores, embedded - started, searched - embedded)

    def _reweighted_scores(
        self, patches: np.ndarray, patch_scores: torch.Tensor, nearest: np.ndarray, view_count: int
    ) -> torch.Tensor:
        """PatchCore's Eq. 7: the max patch score s* (patch m_test, nearest entry m*) times 1 - the softmax weight of
        m* among N_b(m*), the b entries nearest m* (itself first), by distance to m_test.

        N_b(m*) is m* and the first b - 1 other entries the index returns from m*: an approximate index may return
        m* itself later or not at all (HNSW missed 277 of 6,272 rows of a random 152-channel bank; none of MTD's).
        """
        per_view = patch_scores.view(view_count, -1)
        top = per_view.argmax(dim=1).numpy() + np.arange(view_count) * per_view.shape[1]
        anchor_rows = nearest[top]  # m* of each view
        _, found = self.index.search(self.bank.features[anchor_rows], REWEIGHT_NEIGHBOURS)
        # the others in the index's order: a stable sort moves m* (if found) behind them; keep b - 1
        others_first = np.argsort(found == anchor_rows[:, None], axis=1, kind="stable")[:, : found.shape[1] - 1]
        support_rows = np.concatenate([anchor_rows[:, None], np.take_along_axis(found, others_first, axis=1)], axis=1)
        support = torch.from_numpy(self.bank.features[support_rows])  # (views, b, C), m* first
        test = torch.from_numpy(patches[top])[:, None]  # (views, 1, C)
        distances = torch.linalg.vector_norm(support - test, dim=2)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * per_view.amax(dim=1)

    def save(self, model_dir: Path) -> dict[str, Any]:
        self.bank.save(model_dir / BANK_FILE)
        self.index.save(model_dir / INDEX_FILE)
        channels, grid_h, grid_w = self.extractor.output_shape(self.image_size)
        return {
            "bank": self.bank_settings.model_dump(mode="json") | {"rows": self.bank.rows, "kind": self.bank.kind},
            "index": self.index_settings.model_dump(mode="json"),
            "layers": list(self.extractor.backbone.layers),
            "features": {"channels": channels, "grid": [grid_h, grid_w]},
            "files": [BANK_FILE, INDEX_FILE],
        }

    @classmethod
    def load(
        cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device
    ) -> PatchCoreMethod:
        try:
            bank_settings = BankSettings.model_validate({k: v for k, v in section["bank"].items() if k != "rows"})
            index_settings = IndexSettings.model_validate(section["index"])
            bank = MemoryBank.load(model_dir / BANK_FILE, section["bank"]["kind"])
            use_gpu = index_settings.use_gpu == "auto" and device.type == "cuda"
            index = NearestNeighbourIndex.load(
                model_dir / INDEX_FILE, index_settings.kind, use_gpu, index_settings.ivf_probe
            )
        except (KeyError, TypeError, MemoryBankError, IndexError_, ValueError) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None
        consumer = f"bank has {bank.channels} channels"
        extractor = load_extractor(model_dir, section, model, device, consumer, bank.channels)
        return cls(extractor, bank, index, bank_settings, index_settings, model.image_size)

    def describe(self) -> str:
        return f"{self.bank.kind} bank {self.bank.rows} x {self.bank.channels}"


def _coreset_bank(patches: np.ndarray, settings: BankSettings, progress: bool) -> MemoryBank:
    keep = max(1, int(np.ceil(settings.coreset_ratio * patches.shape[0])))
    bar = tqdm(total=keep, desc="fit: greedy coreset", unit="row", disable=not progress, miniters=256)
    chosen = coreset_select(patches, settings.coreset_ratio, settings.coreset_projection_dim, settings.seed,
                            on_step=lambda _step: bar.update(1))  # fmt: skip
    bar.close()
    return MemoryBank(np.ascontiguousarray(patches[chosen]), "coreset")
