"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization").

Fit, one pass over the good images (statistics in ``models.methods.gaussian_stats``):

1. Patch embeddings ``(B, C, h, w)``: the tapped backbone maps, deeper ones bilinearly upsampled to the shallowest
   grid (stride 8 for the default EfficientNet-Lite0 blocks.2 + blocks.4) and concatenated
   (``models.features.PatchFeatureExtractor``; the paper uses raw maps, ``model.aggregation_kernel = 1``).
2. A random subset of at most ``channels`` of the C channels (fixed ``seed``; the indices are saved with the
   model); the default 232 keeps all of EfficientNet-Lite0's blocks.2 + blocks.4 (152) or blocks.2-4 (232).
3. Running sums per position -> mean ``(h * w, d)`` and covariance ``(h * w, d, d)`` + ``regularisation`` x I;
   the inverse covariances are computed once here.

Score: views ``(V, 3, S, S)`` -> embeddings -> the same channels -> Mahalanobis distance of every position to its
own Gaussian -> maps ``(V, h, w)``; with ``inference_radius`` r > 0 (N-pad's inference neighbourhood), the smallest
distance to the Gaussians of the ``(2r + 1)^2`` positions around it
(``models.methods.position_grid.min_neighbour_mahalanobis``, whitening ``A = chol(precision)^T`` computed at load).
No image score of its own: the Scorer takes it from the map (``scoring.image_score``: the paper's is the map
maximum, ``"max"``).

Files: ``padim.npz`` (plain numpy arrays, read with ``allow_pickle=False``): ``channel_indices (d,)``,
``mean (h * w, d)``, ``precision (h * w, d, d)``.
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
from models.features import PatchFeatureExtractor
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from models.methods.gaussian_stats import GaussianMoments, mahalanobis, pool_neighbours, precision_matrix
from models.methods.position_grid import VIEW_CHUNK, min_neighbour_mahalanobis
from pipeline.config import Config, ModelSettings, PadimSettings, ScoringSettings

STATE_FILE = "padim.npz"


def random_channels(total: int, keep: int, seed: int) -> torch.Tensor:
    """``min(keep, total)`` distinct channel indices out of ``total``, sorted, reproducible from ``seed``."""
    if keep < 1:
        msg = f"padim.channels must be at least 1, got {keep}"
        raise ValueError(msg)
    chosen = np.random.default_rng(seed).choice(total, size=min(keep, total), replace=False)
    return torch.from_numpy(np.sort(chosen).astype(np.int64))


def build_extractor(model: ModelSettings, device: torch.device) -> PatchFeatureExtractor:
    backbone = load_backbone(model.backbone, model.layers, model.weights_path)
    return PatchFeatureExtractor(backbone, model.aggregation_kernel, model.feature_dim).to(device)


@torch.inference_mode()
def embed(extractor: PatchFeatureExtractor, views: torch.Tensor, channel_indices: torch.Tensor) -> torch.Tensor:
    """``(V, 3, S, S)`` -> the chosen channels at every position ``(V, h * w, d)`` float32 on the model's device."""
    device = next(extractor.backbone.buffers()).device
    features = extractor(views.to(device, non_blocking=True)).float()
    return features[:, channel_indices.to(device)].flatten(2).transpose(1, 2)


class PadimMethod(AnomalyMethod):
    name: ClassVar[str] = "padim"

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        channel_indices: torch.Tensor,
        mean: torch.Tensor,
        precision: torch.Tensor,
        grid: tuple[int, int],
        settings: PadimSettings,
        image_size: int,
    ) -> None:
        positions, dim = mean.shape
        if (
            positions != grid[0] * grid[1]
            or channel_indices.shape != (dim,)
            or precision.shape != (positions, dim, dim)
        ):
            msg = (
                f"inconsistent PaDiM state: grid {grid}, {tuple(channel_indices.shape)} channels, mean "
                f"{tuple(mean.shape)}, precision {tuple(precision.shape)}"
            )
            raise ValueError(msg)
        device = next(extractor.backbone.buffers()).device
        self.extractor = extractor
        self.channel_indices = channel_indices.to(device)
        self.mean = mean.float().to(device).contiguous()
        self.precision = precision.float().to(device).contiguous()
        # A with A^T A = precision (A = L^T for precision = L L^T): distances to neighbours' Gaussians as ||A (x - mu)||
        radius = settings.inference_radius
        self.whitening = torch.linalg.cholesky(self.precision.double()).mT.float().contiguous() if radius else None
        self.grid = grid
        self.settings = settings
        self.image_size = image_size

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> PadimMethod:
        settings = config.padim
        extractor = build_extractor(config.model, device)
        channels, grid_h, grid_w = extractor.output_shape(config.model.image_size)
        channel_indices = random_channels(channels, settings.channels, settings.seed)
        moments: GaussianMoments | None = None
        bar = tqdm(total=batches.images, desc="fit: PaDiM statistics", unit="img", disable=not progress)
        for batch in batches:
            patches = embed(extractor, batch, channel_indices).cpu()
            if moments is None:  # sums around the first batch's mean keep float64 sums exact
                moments = GaussianMoments(grid_h * grid_w, channel_indices.numel(), patches.mean(dim=0))
            moments.add(patches)
            bar.update(batch.shape[0])
        bar.close()
        if moments is None or moments.count < 2:
            msg = "PaDiM needs at least 2 good images to estimate covariances"
            raise ValueError(msg)
        mean, covariance = pool_neighbours(
            moments.mean(), moments.covariance(unbiased=True), (grid_h, grid_w), settings.pool_radius
        )
        covariance += settings.regularisation * torch.eye(channel_indices.numel(), dtype=torch.float64)
        return cls(extractor, channel_indices, mean.float(), precision_matrix(covariance).float(),
                   (grid_h, grid_w), settings, config.model.image_size)  # fmt: skip

    @torch.inference_mode()
    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        patches = embed(self.extractor, views, self.channel_indices)
        embedded = time.perf_counter()
        if self.whitening is None:
            maps = mahalanobis(patches, self.mean, self.precision).view(views.shape[0], *self.grid)  # (V, h, w)
        else:
            grid_features = patches.transpose(1, 2).reshape(views.shape[0], -1, *self.grid)  # (V, d, h, w)
            radius = self.settings.inference_radius
            maps = torch.cat([min_neighbour_mahalanobis(chunk, self.mean, self.whitening, radius)
                              for chunk in grid_features.split(VIEW_CHUNK)])  # fmt: skip
        maps = maps.float().cpu()
        searched = time.perf_counter()
        return MethodOutput(maps, None, embedded - started, searched - embedded)

    def save(self, model_dir: Path) -> dict[str, Any]:
        with (model_dir / STATE_FILE).open("wb") as handle:
            np.savez(
                handle,
                allow_pickle=False,
                channel_indices=self.channel_indices.cpu().numpy(),
                mean=self.mean.cpu().numpy(),
                precision=self.precision.cpu().numpy(),
            )
        channels, grid_h, grid_w = self.extractor.output_shape(self.image_size)
        return {
            "settings": self.settings.model_dump(mode="json"),
            "layers": list(self.extractor.backbone.layers),
            "features": {"channels": channels, "grid": [grid_h, grid_w]},
            "files": [STATE_FILE],
        }

    @classmethod
    def load(cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device) -> PadimMethod:
        try:
            settings = PadimSettings.model_validate(section["settings"])
            recorded = section["features"]
            backbone = load_backbone(model.backbone, tuple(section["layers"]), model.weights_path)
            extractor = PatchFeatureExtractor(backbone, model.aggregation_kernel, model.feature_dim).to(device)
            with np.load(model_dir / STATE_FILE, allow_pickle=False) as state:
                # clone(): torch's 64-byte-aligned memory, so matrix products round exactly as before saving
                channel_indices = torch.from_numpy(state["channel_indices"]).long()
                mean, precision = torch.from_numpy(state["mean"]).clone(), torch.from_numpy(state["precision"]).clone()
        except (KeyError, TypeError, ValueError, OSError, BackboneError) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None
        channels, grid_h, grid_w = extractor.output_shape(model.image_size)
        if channels != recorded["channels"] or [grid_h, grid_w] != recorded["grid"]:
            msg = (
                f"{model_dir}: backbone {model.backbone} {section['layers']} gives features {channels}x{grid_h}x"
                f"{grid_w}, the model was fitted on {recorded['channels']}x{recorded['grid']}: backbone, weights or "
                "image size mismatch"
            )
            raise ArtifactError(msg)
        if channel_indices.numel() and int(channel_indices.max()) >= channels:
            msg = f"{model_dir}: {STATE_FILE} selects channel {int(channel_indices.max())} of {channels}"
            raise ArtifactError(msg)
        try:
            return cls(extractor, channel_indices, mean, precision, (grid_h, grid_w), settings, model.image_size)
        except ValueError as error:
            msg = f"{model_dir}: {STATE_FILE}: {error}"
            raise ArtifactError(msg) from None

    def describe(self) -> str:
        positions, dim = self.mean.shape
        radius = self.settings.inference_radius
        nearest = f", nearest within {radius} cell{'s' if radius > 1 else ''}" if radius else ""
        grid = f"{self.grid[0]}x{self.grid[1]}"
        return f"PaDiM Gaussians at {positions} positions ({grid}) over {dim} random channels{nearest}"
