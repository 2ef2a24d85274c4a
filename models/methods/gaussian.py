"""Gaussian AD: multivariate Gaussians over deep features (Rippel et al., "Modeling the distribution of normal data
in pre-trained deep features for anomaly detection"), with a per-position variant for anomaly maps.

Fit, one pass over the good images (statistics in ``models.methods.gaussian_stats``):

1. Backbone -> the maps of several stages ``[(B, C_l, h_l, w_l)]`` (EfficientNet-Lite0: blocks.1 .. blocks.6).
2. Image branch: each map averaged over space -> ``(B, C_l)`` (kept: 768 floats per image for the default layers).
   After the pass, per layer: negated PCA keeps the least-variance components holding ``retained_variance`` of
   the variance -> ``(C_l, k_l)``, and a Gaussian with Ledoit-Wolf shrinkage is fitted to the projected vectors.
3. Map branch: the local features of the first ``init_images`` images fix a per-layer least-variance projection
   ``(C_l, m_l)`` (same rule, at most ``position_max_components``); running sums then give one Ledoit-Wolf
   Gaussian per position, ``(h_l * w_l, m_l, m_l)``, whatever the number of images.

Score: views ``(V, 3, S, S)`` -> maps -> image score = sum over layers of the pooled vectors' Mahalanobis
distances ``(V,)`` (returned as view scores); patch map = per-position Mahalanobis distances, bilinearly upsampled
to the finest layer's grid and averaged over layers ``(V, h_1, w_1)``.

Files: ``gaussian.npz`` (plain numpy arrays, read with ``allow_pickle=False``); per layer ``i``:
``image_projection_i (C, k)``, ``image_mean_i (1, k)``, ``image_precision_i (1, k, k)`` and
``position_projection_i (C, m)``, ``position_mean_i (P, m)``, ``position_precision_i (P, m, m)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.backbones import LITE_VARIANTS, Backbone, load_backbone
from models.errors import ArtifactError, BackboneError
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from models.methods.gaussian_stats import GaussianMoments, least_variance_components, mahalanobis, precision_matrix
from pipeline.config import Config, GaussianSettings, ModelSettings, ScoringSettings

STATE_FILE = "gaussian.npz"
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    **{
        f"efficientnet_lite{variant}": ("blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6")
        for variant in LITE_VARIANTS
    },
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3", "layer4"),
}


@dataclass(frozen=True)
class ProjectedGaussians:
    """Gaussians over ``vectors @ projection``, one per position (a single one for pooled image vectors)."""

    projection: torch.Tensor  # (C, k) float32
    mean: torch.Tensor  # (P, k) float32
    precision: torch.Tensor  # (P, k, k) float32

    def __post_init__(self) -> None:
        components = self.projection.shape[1]
        positions = self.mean.shape[0]
        if self.mean.shape != (positions, components) or self.precision.shape != (positions, components, components):
            msg = (
                f"inconsistent Gaussian shapes: projection {tuple(self.projection.shape)}, mean "
                f"{tuple(self.mean.shape)}, precision {tuple(self.precision.shape)}"
            )
            raise ValueError(msg)

    @property
    def positions(self) -> int:
        return int(self.mean.shape[0])

    @property
    def components(self) -> int:
        return int(self.projection.shape[1])

    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(n, P, C)`` -> Mahalanobis distances ``(n, P)``."""
        return mahalanobis(vectors @ self.projection, self.mean, self.precision)

    def to(self, device: torch.device) -> ProjectedGaussians:
        return ProjectedGaussians(
            self.projection.to(device).contiguous(), self.mean.to(device).contiguous(),
            self.precision.to(device).contiguous(),
        )  # fmt: skip


def layers_for(model: ModelSettings) -> tuple[str, ...]:
    """``model.layers`` when set, else every stage of the backbone."""
    return tuple(model.layers) if model.layers else DEFAULT_LAYERS[model.backbone]


def positions_of(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h * w, C)``."""
    return feature_map.flatten(2).transpose(1, 2)


@torch.inference_mode()
def backbone_maps(backbone: Backbone, views: torch.Tensor) -> list[torch.Tensor]:
    """``(V, 3, S, S)`` -> ``[(V, C_l, h_l, w_l)]`` float32 on the backbone's device (no fp16: the least-variance
    directions are small enough for half-precision noise to matter)."""
    device = next(backbone.buffers()).device
    return [feature_map.float() for feature_map in backbone(views.to(device, non_blocking=True))]


def _shrunk_gaussians(projection: torch.Tensor, moments: GaussianMoments) -> ProjectedGaussians:
    shrunk = moments.ledoit_wolf()
    return ProjectedGaussians(projection, moments.mean().float(), precision_matrix(shrunk.covariance).float())


def _project(vectors: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return vectors.cpu().float() @ projection


class _PositionFitter:
    """One layer's per-position Gaussians: projection from the first images' local features, then running sums."""

    def __init__(self, init_maps: torch.Tensor, settings: GaussianSettings) -> None:
        local = positions_of(init_maps).reshape(-1, init_maps.shape[1]).double()
        covariance = torch.cov(local.T)
        self.projection = least_variance_components(
            covariance, settings.retained_variance, settings.position_max_components
        ).float()
        projected = _project(positions_of(init_maps), self.projection)
        self.moments = GaussianMoments(projected.shape[1], projected.shape[2], projected.mean(dim=0), True)
        self.moments.add(projected)

    def add(self, feature_map: torch.Tensor) -> None:
        self.moments.add(_project(positions_of(feature_map), self.projection))

    def finish(self) -> ProjectedGaussians:
        return _shrunk_gaussians(self.projection, self.moments)


def _image_gaussians(pooled: torch.Tensor, settings: GaussianSettings) -> ProjectedGaussians:
    """``(n, C)`` pooled vectors of one layer -> NPCA projection + one Ledoit-Wolf Gaussian."""
    projection = least_variance_components(torch.cov(pooled.double().T), settings.retained_variance).float()
    projected = _project(pooled, projection)[:, None]  # (n, 1, k)
    moments = GaussianMoments(1, projected.shape[2], projected.mean(dim=0), fourth_moments=True)
    moments.add(projected)
    return _shrunk_gaussians(projection, moments)


class GaussianMethod(AnomalyMethod):
    name: ClassVar[str] = "gaussian"

    def __init__(
        self,
        backbone: Backbone,
        image_gaussians: list[ProjectedGaussians],
        position_gaussians: list[ProjectedGaussians],
        settings: GaussianSettings,
        image_size: int,
    ) -> None:
        layers = len(backbone.layers)
        if len(image_gaussians) != layers or len(position_gaussians) != layers:
            msg = f"{layers} layers but {len(image_gaussians)} image and {len(position_gaussians)} position Gaussians"
            raise ValueError(msg)
        device = next(backbone.buffers()).device
        self.backbone = backbone
        self.image_gaussians = [gaussians.to(device) for gaussians in image_gaussians]
        self.position_gaussians = [gaussians.to(device) for gaussians in position_gaussians]
        self.settings = settings
        self.image_size = image_size

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> GaussianMethod:
        settings = config.gaussian
        backbone = load_backbone(config.model.backbone, layers_for(config.model), config.model.weights_path)
        backbone = backbone.to(device)
        layer_count = len(backbone.layers)
        pooled: list[list[torch.Tensor]] = [[] for _ in range(layer_count)]
        init_maps: list[list[torch.Tensor]] = [[] for _ in range(layer_count)]
        buffered = 0
        fitters: list[_PositionFitter] = []
        bar = tqdm(total=batches.images, desc="fit: Gaussian statistics", unit="img", disable=not progress)
        for batch in batches:
            feature_maps = [feature_map.cpu() for feature_map in backbone_maps(backbone, batch)]
            for layer, feature_map in enumerate(feature_maps):
                pooled[layer].append(feature_map.mean(dim=(2, 3)))
                if fitters:
                    fitters[layer].add(feature_map)
                else:
                    init_maps[layer].append(feature_map)
            if not fitters:
                buffered += batch.shape[0]
                if buffered >= settings.init_images:
                    fitters = [_PositionFitter(torch.cat(maps), settings) for maps in init_maps]
                    init_maps = []
            bar.update(batch.shape[0])
        bar.close()
        if sum(vectors.shape[0] for vectors in pooled[0]) < 2:
            msg = "the Gaussian method needs at least 2 good images to estimate covariances"
            raise ValueError(msg)
        if not fitters:  # fewer images than init_images
            fitters = [_PositionFitter(torch.cat(maps), settings) for maps in init_maps]
        image_gaussians = [_image_gaussians(torch.cat(vectors), settings) for vectors in pooled]
        position_gaussians = [fitter.finish() for fitter in fitters]
        return cls(backbone, image_gaussians, position_gaussians, settings, config.model.image_size)

    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        feature_maps = backbone_maps(self.backbone, views)
        embedded = time.perf_counter()
        grid = max(tuple(feature_map.shape[-2:]) for feature_map in feature_maps)
        view_scores = torch.zeros(views.shape[0], device=feature_maps[0].device)
        layer_maps = []
        for feature_map, image_gaussians, position_gaussians in zip(
            feature_maps, self.image_gaussians, self.position_gaussians, strict=True
        ):
            view_scores += image_gaussians.distances(feature_map.mean(dim=(2, 3))[:, None])[:, 0]
            distances = position_gaussians.distances(positions_of(feature_map))  # (V, h * w)
            layer_map = distances.view(feature_map.shape[0], 1, *feature_map.shape[-2:])
            layer_maps.append(F.interpolate(layer_map, size=grid, mode="bilinear", align_corners=False))
        patch_maps = torch.cat(layer_maps, dim=1).mean(dim=1)
        searched = time.perf_counter()
        return MethodOutput(patch_maps.float().cpu(), view_scores.float().cpu(), embedded - started,
                            searched - embedded)  # fmt: skip

    def save(self, model_dir: Path) -> dict[str, Any]:
        arrays: dict[str, np.ndarray] = {}
        for layer, (image, position) in enumerate(zip(self.image_gaussians, self.position_gaussians, strict=True)):
            for kind, gaussians in (("image", image), ("position", position)):
                arrays[f"{kind}_projection_{layer}"] = gaussians.projection.cpu().numpy()
                arrays[f"{kind}_mean_{layer}"] = gaussians.mean.cpu().numpy()
                arrays[f"{kind}_precision_{layer}"] = gaussians.precision.cpu().numpy()
        with (model_dir / STATE_FILE).open("wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)
        return {
            "settings": self.settings.model_dump(mode="json"),
            "layers": list(self.backbone.layers),
            "features": self._feature_shapes(),
            "files": [STATE_FILE],
        }

    def _feature_shapes(self) -> list[dict[str, Any]]:
        shapes = []
        for layer, (channels, height, width) in zip(self.backbone.layers, _probe(self.backbone, self.image_size),
                                                    strict=True):  # fmt: skip
            shapes.append({"layer": layer, "channels": channels, "grid": [height, width]})
        for shape, image, position in zip(shapes, self.image_gaussians, self.position_gaussians, strict=True):
            shape["image_components"] = image.components
            shape["position_components"] = position.components
        return shapes

    @classmethod
    def load(
        cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device
    ) -> GaussianMethod:
        try:
            settings = GaussianSettings.model_validate(section["settings"])
            layers = tuple(section["layers"])
            recorded = section["features"]
            backbone = load_backbone(model.backbone, layers, model.weights_path).to(device)
            with np.load(model_dir / STATE_FILE, allow_pickle=False) as state:
                # clone(): torch's 64-byte-aligned memory, so matrix products round exactly as before saving
                arrays = {key: torch.from_numpy(state[key]).clone() for key in state.files}
            image_gaussians, position_gaussians = [], []
            for layer in range(len(layers)):
                image_gaussians.append(_gaussians_from(arrays, "image", layer))
                position_gaussians.append(_gaussians_from(arrays, "position", layer))
        except (KeyError, TypeError, ValueError, OSError, BackboneError) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None
        method = cls(backbone, image_gaussians, position_gaussians, settings, model.image_size)
        found = method._feature_shapes()
        if found != recorded:
            msg = (
                f"{model_dir}: backbone {model.backbone} {list(layers)} at {model.image_size} px gives features "
                f"{found}, the model was fitted on {recorded}: backbone, weights or image size mismatch"
            )
            raise ArtifactError(msg)
        for shape, image, position in zip(found, image_gaussians, position_gaussians, strict=True):
            height, width = shape["grid"]
            if image.projection.shape[0] != shape["channels"] or position.positions != height * width:
                msg = f"{model_dir}: {STATE_FILE} does not fit layer {shape['layer']} ({shape})"
                raise ArtifactError(msg)
        return method

    def describe(self) -> str:
        image = "+".join(str(gaussians.components) for gaussians in self.image_gaussians)
        position = "+".join(str(gaussians.components) for gaussians in self.position_gaussians)
        return f"Gaussians over {len(self.image_gaussians)} layers: image {image} components, positions {position}"


def _gaussians_from(arrays: dict[str, torch.Tensor], kind: str, layer: int) -> ProjectedGaussians:
    return ProjectedGaussians(
        arrays[f"{kind}_projection_{layer}"].float(),
        arrays[f"{kind}_mean_{layer}"].float(),
        arrays[f"{kind}_precision_{layer}"].float(),
    )


@torch.inference_mode()
def _probe(backbone: Backbone, image_size: int) -> list[tuple[int, int, int]]:
    """``(channels, h, w)`` of every tapped layer for square inputs of ``image_size``."""
    device = next(backbone.buffers()).device
    maps = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    return [(int(m.shape[1]), int(m.shape[2]), int(m.shape[3])) for m in maps]
