"""N-pad: neighbouring-pixel-based anomaly detection (Jang, Hwang and Park, CVPRW 2023).

Features: the frozen backbone's tapped maps on the stride-8 grid, deeper maps upsampled and concatenated
(``models.features`` with no local averaging): ``(V, C_all, h, w)``, ``P = h * w`` positions. Only the
``channels`` sparsest channels are kept (fewest activations above ``activation_epsilon`` over the training set;
for a ReLU backbone that is the paper's "fewest non-zero values"; EfficientNet-Lite0's block outputs are linear
projections, signed and almost never exactly zero, so there it means "fewest activations a ReLU would pass").

Fit (one pass over the good images with running sums; a second pass only when all-channel sums would not fit):

1. Branch 1, per-pixel Gaussians with neighbours. Each position's own Gaussian ``N(mu_q, Sigma_q)``; for every
   pair of positions within ``train_radius`` (Chebyshev, grid cells) the Bhattacharyya distance ``D_B``; the
   position's distribution is the moment-matched mixture of its neighbours' Gaussians weighted by the
   Bhattacharyya similarity ``exp(-D_B / similarity_temperature)`` (itself weight 1). Mahalanobis distances use
   its whitening matrix ``A_p = chol(Sigma_p + ridge)^-1`` (lower triangular; ``A_p^T A_p`` is the inverse
   covariance), stored ``(P, C, C)``.
2. Branch 2, neighbourhood-averaged features (``npad.averaging_kernel`` x k mean): their per-position Gaussians
   (whitening ``(P, C, C)``, optional) and, for ``score = "geometric_mean"``, ``centroid_ratio`` x a bounded random
   sample of them clustered by faiss k-means into centroids ``(K, C)``.

Score ``(V, 3, S, S)`` -> one backbone call -> kept channels ``x (V, C, h, w)`` and averaged ``x_bar``:

- Mahalanobis map ``M(p)``: min over the distributions of the positions ``q`` within ``inference_radius`` of p of
  ``||A_q (x_p - mu_q)||`` (branch 1), averaged with the same for ``x_bar`` against branch 2's Gaussians.
- Euclidean map ``E(p)``: distance from ``x_bar_p`` to its nearest centroid.
- ``score = "geometric_mean"`` (the paper): patch map ``sqrt(M * E)`` (the two have different units; the geometric
  mean's ranking ignores their scales), view score ``sqrt(topk_mean(M) * topk_mean(E))`` over ``scoring.top_k``
  positions. ``score = "mahalanobis"``: ``M`` and ``topk_mean(M)`` alone, no k-means (see config.py for why).

The Scorer adds N-pad's image shifting (``[scoring] shift_pixels``), upsampling and smoothing.

Files: ``channels.npy (C,)``, ``pixel_mean.npy (P, C)``, ``pixel_whitening.npy (P, C, C)``,
``averaged_mean.npy`` / ``averaged_whitening.npy`` (when ``averaged_gaussian``), ``centroids.npy (K, C)`` (when
``score = "geometric_mean"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.backbones import load_backbone
from models.errors import ArtifactError, BackboneError
from models.features import PatchFeatureExtractor, embed_on_device
from models.index import IndexError_, NearestNeighbourIndex
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from models.methods.position_grid import (
    VIEW_CHUNK,
    min_neighbour_mahalanobis,
    neighbour_offsets,
    per_position,
    single_threaded_kernels,
    valid_slices,
    whitening_matrices,
)
from pipeline.config import Config, ModelSettings, NpadSettings, ScoringSettings

CHANNELS_FILE = "channels.npy"
PIXEL_MEAN_FILE = "pixel_mean.npy"
PIXEL_WHITENING_FILE = "pixel_whitening.npy"
AVERAGED_MEAN_FILE = "averaged_mean.npy"
AVERAGED_WHITENING_FILE = "averaged_whitening.npy"
CENTROIDS_FILE = "centroids.npy"
ALL_CHANNEL_SUMS_BUDGET = 1 << 30  # bytes: above this, count channel sparsity in a first pass, sum in a second
FIT_MEMORY_LIMIT = 4 << 30  # bytes of per-position sums + covariances: refuse settings that need more


# ---------------------------------------------------------------------------------------------------------------
# The paper's pieces, each a pure function
# ---------------------------------------------------------------------------------------------------------------


def sparsest_channels(positive_counts: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of the ``keep`` channels with the fewest activations above epsilon; ties by index."""
    if not 0 < keep <= positive_counts.size:
        msg = f"cannot keep {keep} of {positive_counts.size} channels"
        raise ValueError(msg)
    order = np.argsort(positive_counts, kind="stable")
    return np.sort(order[:keep]).astype(np.int64)


def log_determinant(covariances: torch.Tensor) -> torch.Tensor:
    """``(..., C, C)`` symmetric positive definite -> ``(...)`` log det, via Cholesky."""
    factor = torch.linalg.cholesky(covariances)
    return 2 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)


def bhattacharyya_distance(
    mean_a: torch.Tensor,
    cov_a: torch.Tensor,
    mean_b: torch.Tensor,
    cov_b: torch.Tensor,
    log_det_a: torch.Tensor | None = None,
    log_det_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Between Gaussians, batched: means ``(..., C)``, covariances ``(..., C, C)`` -> ``(...)``.

    ``D_B = 1/8 d^T S^-1 d + 1/2 (log det S - (log det S_a + log det S_b) / 2)``, ``S = (S_a + S_b) / 2``;
    pass the log determinants of ``cov_a`` / ``cov_b`` when they are already known.
    """
    factor = torch.linalg.cholesky((cov_a + cov_b) / 2)
    difference = (mean_a - mean_b).unsqueeze(-1)
    mean_term = torch.linalg.solve_triangular(factor, difference, upper=False).square().sum(dim=(-2, -1)) / 8
    log_det = 2 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)
    log_det_a = log_determinant(cov_a) if log_det_a is None else log_det_a
    log_det_b = log_determinant(cov_b) if log_det_b is None else log_det_b
    return mean_term + (log_det - (log_det_a + log_det_b) / 2) / 2


def neighbour_weights(
    means: torch.Tensor, covariances: torch.Tensor, grid: tuple[int, int], radius: int, temperature: float
) -> torch.Tensor:
    """Bhattacharyya similarity of each position's Gaussian to each neighbour's: ``(O, h, w)``, O = (2r + 1)^2.

    ``weights[o, p] = exp(-D_B(p, p + offset_o) / temperature)``; 1 for the position itself, 0 off the grid.
    ``means (P, C)`` and ``covariances (P, C, C)`` are row-major over the grid.
    """
    height, width = grid
    channels = means.shape[1]
    mean_grid = means.view(height, width, channels)
    cov_grid = covariances.view(height, width, channels, channels)
    log_det_grid = per_position(log_determinant, covariances).view(height, width)
    offsets = neighbour_offsets(radius)
    weights = torch.zeros(len(offsets), height, width, dtype=means.dtype, device=means.device)
    index = {offset: position for position, offset in enumerate(offsets)}
    for (dy, dx), position in index.items():
        if (dy, dx) == (0, 0):
            weights[position] = 1.0
        if dy < 0 or (dy == 0 and dx <= 0):
            continue  # D_B is symmetric: each unordered pair is computed once, from its first position
        at_p, at_q = valid_slices(grid, dy, dx)
        pairs = [grid_[at_p].flatten(0, 1) for grid_ in (mean_grid, cov_grid)]
        pairs += [grid_[at_q].flatten(0, 1) for grid_ in (mean_grid, cov_grid)]
        pairs += [log_det_grid[at_p].flatten(), log_det_grid[at_q].flatten()]
        distance = per_position(bhattacharyya_distance, *pairs).view(weights[position][at_p].shape)
        similarity = torch.exp(-distance / temperature)
        weights[position][at_p] = similarity
        weights[index[(-dy, -dx)]][at_q] = similarity
    return weights


def weighted_gaussians(
    means: torch.Tensor, covariances: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int], radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's distribution from its neighbours': the moment-matched mixture with ``weights (O, h, w)``.

    ``mu_p = sum_q w_pq mu_q / W_p`` and ``Sigma_p = sum_q w_pq (Sigma_q + mu_q mu_q^T) / W_p - mu_p mu_p^T``.
    """
    height, width = grid
    channels = means.shape[1]
    mean_grid = means.view(height, width, channels)
    second_grid = (covariances + means[:, :, None] * means[:, None, :]).view(height, width, channels, channels)
    mixed_mean = torch.zeros_like(mean_grid)
    mixed_second = torch.zeros_like(second_grid)
    for position, (dy, dx) in enumerate(neighbour_offsets(radius)):
        at_p, at_q = valid_slices(grid, dy, dx)
        weight = weights[position][at_p]
        mixed_mean[at_p] += weight[..., None] * mean_grid[at_q]
        mixed_second[at_p] += weight[..., None, None] * second_grid[at_q]
    total = weights.sum(dim=0)
    mixed_mean /= total[..., None]
    mixed_second /= total[..., None, None]
    mixed_cov = mixed_second - mixed_mean[..., :, None] * mixed_mean[..., None, :]
    return mixed_mean.reshape(-1, channels), mixed_cov.reshape(-1, channels, channels)


def regularise(covariances: torch.Tensor, amount: float) -> torch.Tensor:
    """``Sigma + amount x mean variance x I`` for ``(P, C, C)``: positive definite even from fewer images than
    channels, and scale-free (unlike PaDiM's fixed 0.01 I)."""
    identity = torch.eye(covariances.shape[-1], dtype=covariances.dtype, device=covariances.device)
    mean_variance = torch.diagonal(covariances, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    return covariances + (amount * mean_variance)[:, None, None] * identity


def neighbourhood_average(features: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(V, C, h, w)`` averaged over each position's ``kernel x kernel`` neighbourhood (borders: valid cells)."""
    if kernel == 1:
        return features
    return F.avg_pool2d(features, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """``(V, h, w)`` -> ``(V,)``: mean of each map's ``k`` highest values."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Running sums over the training set
# ---------------------------------------------------------------------------------------------------------------


class GaussianSums:
    """Per-position running sums of ``(B, C, h, w)`` feature maps, so memory never grows with the images.

    Products are added in place into float32 sums (allocating a fresh ``(P, C, C)`` product per batch costs 5x
    more), which move into the float64 totals every ``FLUSH_IMAGES`` images.
    """

    FLUSH_IMAGES = 64

    def __init__(self, channels: int, positions: int, device: torch.device) -> None:
        self.count = 0
        self.first = torch.zeros(positions, channels, dtype=torch.float64, device=device)
        self.second = torch.zeros(positions, channels, channels, dtype=torch.float64, device=device)
        self._pending = 0
        self._pending_first = torch.zeros(positions, channels, device=device)
        self._pending_second = torch.zeros(positions, channels, channels, device=device)

    def add(self, features: torch.Tensor) -> None:
        rows = features.flatten(2).permute(2, 0, 1)  # (P, B, C)
        self._pending_first += rows.sum(dim=1)
        with single_threaded_kernels():  # one small matmul per position: see single_threaded_kernels
            self._pending_second.baddbmm_(rows.transpose(1, 2), rows)
        self._pending += features.shape[0]
        self.count += features.shape[0]
        if self._pending >= self.FLUSH_IMAGES:
            self._flush()

    def _flush(self) -> None:
        self.first += self._pending_first.double()
        self.second += self._pending_second.double()
        self._pending_first.zero_()
        self._pending_second.zero_()
        self._pending = 0

    def select(self, channels: torch.Tensor) -> GaussianSums:
        """The same sums restricted to ``channels``."""
        self._flush()
        chosen = GaussianSums(channels.numel(), self.first.shape[0], self.first.device)
        chosen.count = self.count
        chosen.first = self.first[:, channels].contiguous()
        chosen.second = self.second[:, channels][:, :, channels].contiguous()
        return chosen

    def gaussians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position means ``(P, C)`` and unbiased covariances ``(P, C, C)``, float64."""
        if self.count < 2:
            msg = f"N-pad needs at least 2 good images to estimate covariances, got {self.count}"
            raise ValueError(msg)
        self._flush()
        means = self.first / self.count
        outer = means[:, :, None] * means[:, None, :]
        covariances = (self.second / self.count - outer) * (self.count / (self.count - 1))
        return means, covariances


@dataclass
class TrainingStatistics:
    channels: np.ndarray  # (C,) kept channel indices into the backbone's concatenated channels
    pixel: GaussianSums  # raw features, kept channels
    averaged: GaussianSums  # neighbourhood-averaged features, kept channels
    kmeans_sample: torch.Tensor  # (rows, C) averaged features at random positions, float32


@dataclass
class PixelGaussians:
    """One Gaussian per grid position: ``means (P, C)`` and ``whitening (P, C, C)`` float32."""

    means: torch.Tensor
    whitening: torch.Tensor

    def distances(self, features: torch.Tensor, radius: int) -> torch.Tensor:
        """``(V, C, h, w)`` -> min-over-neighbours Mahalanobis ``(V, h, w)``, in chunks of views."""
        chunks = [
            min_neighbour_mahalanobis(chunk, self.means, self.whitening, radius) for chunk in features.split(VIEW_CHUNK)
        ]
        return torch.cat(chunks)


def gaussians_from_sums(
    sums: GaussianSums, settings: NpadSettings, grid: tuple[int, int], neighbours: bool
) -> PixelGaussians:
    """Per-position Gaussians, with Bhattacharyya-weighted neighbours when ``neighbours`` (branch 1)."""
    means, covariances = sums.gaussians()
    covariances = regularise(covariances, settings.covariance_regularisation)
    if neighbours and settings.train_radius > 0:
        weights = neighbour_weights(means, covariances, grid, settings.train_radius, settings.similarity_temperature)
        means, covariances = weighted_gaussians(means, covariances, weights, grid, settings.train_radius)
    whitening = per_position(whitening_matrices, covariances)
    return PixelGaussians(means.float(), whitening.float())


def kmeans_centroids(sample: np.ndarray, ratio: float, iterations: int, seed: int) -> np.ndarray:
    """faiss k-means over ``sample (rows, C)`` into ``ceil(ratio x rows)`` centroids ``(K, C)``."""
    import faiss

    clusters = max(1, min(sample.shape[0], math.ceil(ratio * sample.shape[0])))
    kmeans = faiss.Kmeans(sample.shape[1], clusters, niter=iterations, seed=seed, verbose=False)
    kmeans.cp.min_points_per_centroid = 1  # the paper keeps 10% of the features as centroids: ~10 points each
    kmeans.cp.max_points_per_centroid = max(256, math.ceil(sample.shape[0] / clusters))
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


def build_extractor(model: ModelSettings, device: torch.device) -> PatchFeatureExtractor:
    """Raw per-position features (no local averaging: branch 2 averages the kept channels itself)."""
    if model.feature_dim is not None:
        msg = "npad keeps the sparsest backbone channels itself: set [npad] channels and leave model.feature_dim unset"
        raise ValueError(msg)
    backbone = load_backbone(model.backbone, model.layers, model.weights_path)
    return PatchFeatureExtractor(backbone, aggregation_kernel=1).to(device)


class NpadMethod(AnomalyMethod):
    name: ClassVar[str] = "npad"

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        channels: np.ndarray,
        pixel: PixelGaussians,
        averaged: PixelGaussians | None,
        centroids: np.ndarray | None,
        settings: NpadSettings,
        model: ModelSettings,
        grid: tuple[int, int],
    ) -> None:
        kept = channels.size
        if pixel.means.shape != (grid[0] * grid[1], kept) or pixel.whitening.shape[1:] != (kept, kept):
            msg = f"branch-1 Gaussians {tuple(pixel.whitening.shape)} do not fit {kept} channels on a {grid} grid"
            raise ValueError(msg)
        if averaged is not None and averaged.whitening.shape != pixel.whitening.shape:
            msg = f"branch-2 Gaussians {tuple(averaged.whitening.shape)} differ from branch 1's"
            raise ValueError(msg)
        if (centroids is None) != (settings.score == "mahalanobis"):
            msg = f"score = {settings.score!r} {'needs' if centroids is None else 'has no use for'} centroids"
            raise ValueError(msg)
        if centroids is not None and (centroids.ndim != 2 or centroids.shape[1] != kept or centroids.shape[0] == 0):
            msg = f"centroids must be (K>0, {kept}), got {centroids.shape}"
            raise ValueError(msg)
        self.extractor = extractor
        self.channels = channels
        self.channel_index = torch.from_numpy(channels).to(pixel.means.device)
        self.pixel = pixel
        self.averaged = averaged
        self.centroids = centroids
        self.index = None if centroids is None else NearestNeighbourIndex.build(centroids, "flat")
        self.settings = settings
        self.model = model
        self.grid = grid

    # -- fit ---------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> NpadMethod:
        settings = config.npad
        extractor = build_extractor(config.model, device)
        all_channels, height, width = extractor.output_shape(config.model.image_size)
        if settings.channels > all_channels:
            msg = f"npad.channels = {settings.channels} but the backbone layers give only {all_channels} channels"
            raise ValueError(msg)
        _check_memory(settings.channels, height * width)
        statistics = _collect_statistics(batches, extractor, config, all_channels, (height, width), device, progress)
        grid = (height, width)
        started = time.perf_counter()
        pixel = gaussians_from_sums(statistics.pixel, settings, grid, neighbours=True)
        averaged = (
            gaussians_from_sums(statistics.averaged, settings, grid, neighbours=False)
            if settings.averaged_gaussian
            else None
        )
        centroids = None
        if settings.score == "geometric_mean":
            sample = statistics.kmeans_sample.cpu().numpy()
            centroids = kmeans_centroids(sample, settings.centroid_ratio, settings.kmeans_iterations, settings.seed)
        if progress:
            tqdm.write(f"fit: Gaussians, Bhattacharyya weights and k-means in {time.perf_counter() - started:.1f} s")
        return cls(extractor, statistics.channels, pixel, averaged, centroids, settings, config.model, grid)

    # -- score -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        features = embed_on_device(self.extractor, views).index_select(1, self.channel_index)
        averaged = neighbourhood_average(features, self.settings.averaging_kernel)
        embedded = time.perf_counter()
        radius = self.settings.inference_radius
        mahalanobis = self.pixel.distances(features, radius)
        if self.averaged is not None:
            mahalanobis = (mahalanobis + self.averaged.distances(averaged, radius)) / 2
        mahalanobis = mahalanobis.cpu()
        if self.index is None:
            maps, view_scores = mahalanobis, top_k_mean(mahalanobis, scoring.top_k)
        else:
            view_count, channels, height, width = averaged.shape
            queries = averaged.permute(0, 2, 3, 1).reshape(-1, channels).cpu().numpy()
            nearest, _ = self.index.search(queries, 1)
            euclidean = torch.from_numpy(nearest[:, 0].copy()).view(view_count, height, width)
            maps = torch.sqrt(mahalanobis * euclidean)
            view_scores = torch.sqrt(top_k_mean(mahalanobis, scoring.top_k) * top_k_mean(euclidean, scoring.top_k))
        searched = time.perf_counter()
        return MethodOutput(maps.float(), view_scores.float(), embedded - started, searched - embedded)

    # -- artifact ----------------------------------------------------------------------------------------------

    def save(self, model_dir: Path) -> dict[str, Any]:
        storage = np.float16 if self.settings.whitening_dtype == "float16" else np.float32
        arrays: dict[str, np.ndarray] = {
            CHANNELS_FILE: self.channels,
            PIXEL_MEAN_FILE: self.pixel.means.cpu().numpy(),
            PIXEL_WHITENING_FILE: self.pixel.whitening.cpu().numpy().astype(storage),
        }
        if self.centroids is not None:
            arrays[CENTROIDS_FILE] = self.centroids
        if self.averaged is not None:
            arrays[AVERAGED_MEAN_FILE] = self.averaged.means.cpu().numpy()
            arrays[AVERAGED_WHITENING_FILE] = self.averaged.whitening.cpu().numpy().astype(storage)
        for name, array in arrays.items():
            np.save(model_dir / name, array, allow_pickle=False)
        return {
            "settings": self.settings.model_dump(mode="json"),
            "layers": list(self.extractor.backbone.layers),
            "features": {"channels": int(self.channels.size), "grid": list(self.grid)},
            "centroids": 0 if self.centroids is None else int(self.centroids.shape[0]),
            "arrays": sorted(arrays),  # kept for load: the artifact moves "files" into its checksum list
            "files": sorted(arrays),
        }

    @classmethod
    def load(cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device) -> NpadMethod:
        try:
            settings = NpadSettings.model_validate(section["settings"])
            grid = (int(section["features"]["grid"][0]), int(section["features"]["grid"][1]))
            layers = tuple(section["layers"])
            arrays = {name: np.load(model_dir / name, allow_pickle=False) for name in section["arrays"]}
            backbone = load_backbone(model.backbone, layers, model.weights_path)
        except (KeyError, TypeError, IndexError, ValueError, OSError, BackboneError) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None
        extractor = PatchFeatureExtractor(backbone, aggregation_kernel=1).to(device)
        all_channels, height, width = extractor.output_shape(model.image_size)
        channels = arrays[CHANNELS_FILE].astype(np.int64)
        if (height, width) != grid or channels.size == 0 or int(channels.max()) >= all_channels:
            msg = (
                f"{model_dir}: backbone {model.backbone} {list(layers)} gives {all_channels} channels on a "
                f"{height}x{width} grid; the model was fitted on a {grid[0]}x{grid[1]} grid with channel indices up "
                f"to {int(channels.max()) if channels.size else None}: backbone, layers or image size mismatch"
            )
            raise ArtifactError(msg)

        def gaussians(mean_file: str, whitening_file: str) -> PixelGaussians:
            means = torch.from_numpy(arrays[mean_file].astype(np.float32)).to(device)
            whitening = torch.from_numpy(arrays[whitening_file].astype(np.float32)).to(device)
            return PixelGaussians(means, whitening)

        averaged = gaussians(AVERAGED_MEAN_FILE, AVERAGED_WHITENING_FILE) if settings.averaged_gaussian else None
        try:
            centroids = arrays[CENTROIDS_FILE].astype(np.float32) if CENTROIDS_FILE in arrays else None
            pixel = gaussians(PIXEL_MEAN_FILE, PIXEL_WHITENING_FILE)
            return cls(extractor, channels, pixel, averaged, centroids, settings, model, grid)
        except (KeyError, ValueError, IndexError_) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None

    def describe(self) -> str:
        branches = "pixel + averaged Gaussians" if self.averaged is not None else "pixel Gaussians"
        centroids = "no centroids" if self.centroids is None else f"{self.centroids.shape[0]} centroids"
        return (
            f"{branches} {self.grid[0]}x{self.grid[1]} x {self.channels.size} ch "
            f"(train r{self.settings.train_radius}, inference r{self.settings.inference_radius}), {centroids}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Fitting passes
# ---------------------------------------------------------------------------------------------------------------


def _check_memory(channels: int, positions: int) -> None:
    needed = 2 * positions * channels * channels * 8 * 2  # two branches' float64 sums + one working covariance set
    if needed > FIT_MEMORY_LIMIT:
        msg = (
            f"npad with {channels} channels on {positions} positions needs about {needed / 2**30:.1f} GiB of "
            f"per-position covariances; lower npad.channels (memory grows with channels squared) or model.image_size"
        )
        raise ValueError(msg)


def _embedded(
    batches: ImageBatches, extractor: PatchFeatureExtractor, progress: bool, desc: str
) -> Iterator[torch.Tensor]:
    bar = tqdm(total=batches.images, desc=desc, unit="img", disable=not progress)
    for batch in batches:
        yield embed_on_device(extractor, batch)
        bar.update(batch.shape[0])
    bar.close()


def _collect_statistics(
    batches: ImageBatches,
    extractor: PatchFeatureExtractor,
    config: Config,
    all_channels: int,
    grid: tuple[int, int],
    device: torch.device,
    progress: bool,
) -> TrainingStatistics:
    """Channel sparsity, per-position sums of both branches and the k-means sample, in one pass when the
    all-channel sums fit ``ALL_CHANNEL_SUMS_BUDGET`` (channels chosen afterwards), else in two."""
    settings = config.npad
    positions = grid[0] * grid[1]
    kernel = settings.averaging_kernel
    sample_rows = settings.kmeans_sample if settings.score == "geometric_mean" else 0
    per_image = math.ceil(sample_rows / max(1, batches.images))
    generator = torch.Generator().manual_seed(settings.seed)
    one_pass = 2 * positions * all_channels * all_channels * 8 <= ALL_CHANNEL_SUMS_BUDGET
    positive = torch.zeros(all_channels, dtype=torch.int64, device=device)
    kept: torch.Tensor | None = None
    if not one_pass:
        for features in _embedded(batches, extractor, progress, "fit: counting channel activations"):
            positive += (features > settings.activation_epsilon).sum(dim=(0, 2, 3))
        kept = torch.from_numpy(sparsest_channels(positive.cpu().numpy(), settings.channels)).to(device)
    summed_channels = all_channels if kept is None else settings.channels
    pixel = GaussianSums(summed_channels, positions, device)
    averaged = GaussianSums(summed_channels, positions, device)
    sample: list[torch.Tensor] = []
    for features in _embedded(batches, extractor, progress, "fit: per-position statistics"):
        if kept is None:
            positive += (features > settings.activation_epsilon).sum(dim=(0, 2, 3))
        else:
            features = features.index_select(1, kept)
        smoothed = neighbourhood_average(features, kernel)
        pixel.add(features)
        averaged.add(smoothed)
        if per_image:  # a few random averaged features of every image, for k-means
            for image_rows in smoothed.flatten(2).permute(0, 2, 1):  # (P, C)
                chosen = torch.randperm(positions, generator=generator)[: min(per_image, positions)]
                sample.append(image_rows[chosen.to(device)].cpu())
    if kept is None:
        kept = torch.from_numpy(sparsest_channels(positive.cpu().numpy(), settings.channels)).to(device)
        pixel, averaged = pixel.select(kept), averaged.select(kept)
        sample = [rows[:, kept.cpu()] for rows in sample]
    kmeans_sample = torch.cat(sample)[:sample_rows] if sample else torch.empty(0, kept.numel())
    return TrainingStatistics(kept.cpu().numpy(), pixel, averaged, kmeans_sample)
