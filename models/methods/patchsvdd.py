"""Patch SVDD (Yi & Yoon, ACCV 2020) and, as ``variant = "multiscale"``, multi-scale patch learning (Tsai et al.,
WACV 2022): patch encoders trained from scratch on good images, scored by the distance to the nearest good patch.

Fit (``[patchsvdd]`` settings):

1. Every good image, resized to ``(S, S)``, is kept in memory as uint8; inputs are standardised by the training
   images' channel mean.
2. Training draws, per scale K (32 and 64 px; 16, 32 and 64 for multiscale) and step, ``batch_size`` anchors at
   random positions of random images and three more patches per anchor:
   - a *neighbour* in one of 8 directions, ``3K/4 .. K - 1`` pixels away (no clipping at the border, so the label
     is always true), both patches with a small colour shift and noise: the self-supervised task, cross-entropy
     of ``PositionClassifier(h(anchor) - h(neighbour))`` over the 8 positions;
   - a *jittered* copy of the anchor, moved by up to ``max(1, K // 32)`` pixels: SVDD' pulls the two embeddings
     together, ``||h(anchor) - h(jittered)||`` (patchsvdd, weight ``svdd_weight`` = the paper's lambda), or
     ``1 - cos`` plus a margin ranking that the jittered patch is more similar than the neighbour (multiscale);
   - multiscale only: a k-means loss pulling each anchor embedding to its nearest of ``kmeans_clusters``
     centroids, which follow the embeddings by an exponential moving average (mini-batch k-means).
   Adam, fixed seeds, stops after ``epochs`` passes or ``max_train_seconds`` (whichever comes first); the losses
   reached are recorded in the manifest.
3. The bank: each scale's embeddings of training patches at pixel stride ``stride``, ``bank_rows`` per scale
   drawn uniformly (a fixed quota per image, so memory is bounded), indexed with faiss.

Score: views ``(V, 3, S, S)`` -> one dense pass of the encoders (no layer pads, so the smallest encoder run on the
whole image embeds every K-pixel patch at pixel stride 2 and the hierarchical encoders reuse that map) ->
per scale, patches at stride ``stride`` ``(V * P * P, D)`` -> nearest bank distance -> each patch's score spread
evenly over the ``stride``-pixel cells it covers (mean where patches overlap) -> the scales' maps multiplied ->
patch maps ``(V, S / stride, S / stride)``. The Scorer makes the image score from that map.

Files: ``encoders.pt`` (state dict), ``bank_<K>.npy`` ``(rows, D)`` float32 and ``index_<K>.faiss`` per scale.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.errors import ArtifactError
from models.index import IndexError_, NearestNeighbourIndex
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from models.methods.patchsvdd_nets import PatchEncoders, PositionClassifier
from pipeline.config import Config, IndexSettings, ModelSettings, PatchSVDDSettings, ScoringSettings

ENCODERS_FILE = "encoders.pt"
# Relative position label -> (row, column) direction of the neighbour, as in the paper's Figure 3.
POSITION_OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
NOISE_SCALE = 0.02  # the official code's colour shift and additive noise on position-task patches
KMEANS_MOMENTUM = 0.9


def patch_sizes(settings: PatchSVDDSettings) -> tuple[int, ...]:
    """Smallest first: (32, 64) for patchsvdd, (16, 32, 64) for multiscale (with patch_size 64)."""
    levels = 3 if settings.variant == "multiscale" else 2
    return tuple(settings.patch_size >> (levels - 1 - level) for level in range(levels))


def bank_file(size: int) -> str:
    return f"bank_{size}.npy"


def index_file(size: int) -> str:
    return f"index_{size}.faiss"


# -- training pairs ---------------------------------------------------------------------------------------------


def sample_position_pairs(
    rng: np.random.Generator, count: int, image_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchors ``(count, 2)`` (row, column of the top-left pixel), neighbours ``(count, 2)`` and labels ``(count,)``.

    The neighbour lies in direction ``POSITION_OFFSETS[label]``, ``3K/4 + u`` pixels away along each moving axis
    (u uniform in ``[0, K/4)``, the paper's gap-and-jitter), and both patches lie inside the image: the anchor is
    drawn from the positions that leave room for its neighbour, instead of clipping the neighbour (which the
    official code does, mislabelling pairs at the border).
    """
    span = image_size - patch_size
    base, jitter = 3 * patch_size // 4, max(1, patch_size // 4)
    if span < base + jitter - 1:
        msg = f"{image_size}-px images are too small for the position task at {patch_size} px (need {2 * patch_size})"
        raise ValueError(msg)
    labels = rng.integers(len(POSITION_OFFSETS), size=count)
    directions = np.array(POSITION_OFFSETS)[labels]  # (count, 2)
    offsets = directions * (base + rng.integers(jitter, size=(count, 2)))
    low = np.maximum(0, -offsets)
    high = span - np.maximum(0, offsets)  # inclusive
    anchors = low + np.floor(rng.random((count, 2)) * (high - low + 1)).astype(np.int64)
    return anchors, anchors + offsets, labels


def jittered(rng: np.random.Generator, anchors: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Positions ``(count, 2)`` moved by up to ``max(1, K // 32)`` pixels (never by zero), kept inside the image."""
    reach = max(1, patch_size // 32)
    moves = rng.integers(-reach, reach + 1, size=anchors.shape)
    still = ~moves.any(axis=1)
    while still.any():
        moves[still] = rng.integers(-reach, reach + 1, size=(int(still.sum()), 2))
        still = ~moves.any(axis=1)
    return np.clip(anchors + moves, 0, image_size - patch_size)


def crop(images: torch.Tensor, which: np.ndarray, positions: np.ndarray, patch_size: int) -> torch.Tensor:
    """uint8 images ``(N, 3, S, S)`` -> float patches ``(count, 3, K, K)`` in [0, 1]."""
    patches = [images[n, :, r : r + patch_size, c : c + patch_size] for n, (r, c) in zip(which, positions, strict=True)]
    return torch.stack(patches).float().div_(255.0)


@dataclass
class TrainingRecord:
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    stopped_by: str = "epochs"
    first_losses: dict[str, float] | None = None
    final_losses: dict[str, float] | None = None  # running means over the last steps


class PatchSVDDTrainer:
    """The losses of one training step, for every scale; owns the classifiers and the k-means centroids."""

    def __init__(self, encoders: PatchEncoders, settings: PatchSVDDSettings, image_size: int, seed: int) -> None:
        self.encoders = encoders
        self.settings = settings
        self.image_size = image_size
        self.rng = np.random.default_rng(seed)
        self.classifiers = torch.nn.ModuleDict(
            {str(size): PositionClassifier(settings.embedding_dim) for size in encoders.patch_sizes}
        )
        self.centroids: dict[int, torch.Tensor] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoders.parameters()) + list(self.classifiers.parameters())

    def losses(self, images: torch.Tensor, which: np.ndarray) -> dict[str, torch.Tensor]:
        """One step's losses (named per scale) for anchors drawn from ``images[which]`` (uint8, on the device)."""
        losses: dict[str, torch.Tensor] = {}
        multiscale = self.settings.variant == "multiscale"
        for size in self.encoders.patch_sizes:
            count = len(which)
            anchors, neighbours, labels = sample_position_pairs(self.rng, count, self.image_size, size)
            near = jittered(self.rng, anchors, self.image_size, size)
            position_pair = torch.cat([crop(images, which, anchors, size), crop(images, which, neighbours, size)])
            shift = torch.from_numpy(self.rng.normal(0, NOISE_SCALE, (2 * count, 3, 1, 1)).astype(np.float32))
            noise = torch.from_numpy(self.rng.normal(0, NOISE_SCALE, position_pair.shape).astype(np.float32))
            position_pair = position_pair + shift.to(images.device) + noise.to(images.device)
            svdd_pair = torch.cat([crop(images, which, anchors, size), crop(images, which, near, size)])
            batch = self.encoders.standardise(torch.cat([position_pair, svdd_pair]))
            embedded = self.encoders.embed_patches(batch, size)
            anchor_aug, neighbour_aug, anchor, anchor_near = embedded.split(count)
            logits = self.classifiers[str(size)](anchor_aug, neighbour_aug)
            losses[f"pos{size}"] = F.cross_entropy(logits, torch.from_numpy(labels).to(images.device))
            if not multiscale:
                losses[f"svdd{size}"] = (anchor - anchor_near).norm(dim=1).mean()
                continue
            close = F.cosine_similarity(anchor, anchor_near, dim=1)
            apart = F.cosine_similarity(anchor, neighbour_aug, dim=1)
            losses[f"cos{size}"] = (1.0 - close).mean()
            losses[f"rank{size}"] = F.relu(apart - close + self.settings.similarity_margin).mean()
            losses[f"km{size}"] = self._kmeans_loss(size, F.normalize(anchor, dim=1))
        return losses

    def _kmeans_loss(self, size: int, embeddings: torch.Tensor) -> torch.Tensor:
        """Squared distance to the nearest centroid; centroids move towards their members' mean (EMA)."""
        clusters = min(self.settings.kmeans_clusters, embeddings.shape[0])
        if size not in self.centroids:
            pick = torch.from_numpy(self.rng.choice(embeddings.shape[0], clusters, replace=False))
            self.centroids[size] = embeddings.detach()[pick.to(embeddings.device)].clone()
        centroids = self.centroids[size]
        assigned = torch.cdist(embeddings.detach(), centroids).argmin(dim=1)
        loss = (embeddings - centroids[assigned]).pow(2).sum(dim=1).mean()
        with torch.no_grad():
            for cluster in assigned.unique():
                members = embeddings.detach()[assigned == cluster].mean(dim=0)
                centroids[cluster] = KMEANS_MOMENTUM * centroids[cluster] + (1 - KMEANS_MOMENTUM) * members
        return loss

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        settings = self.settings
        weights = {"pos": 1.0, "svdd": settings.svdd_weight, "cos": settings.svdd_weight,
                   "rank": settings.svdd_weight, "km": settings.kmeans_weight}  # fmt: skip
        return sum((weights[name.rstrip("0123456789")] * value for name, value in losses.items()), torch.zeros(()))


def train_encoders(
    encoders: PatchEncoders, images: torch.Tensor, settings: PatchSVDDSettings, progress: bool
) -> TrainingRecord:
    """Train ``encoders`` on uint8 images ``(N, 3, S, S)`` within the epochs / seconds budget."""
    torch.manual_seed(settings.seed)
    trainer = PatchSVDDTrainer(encoders, settings, images.shape[-1], settings.seed)
    trainer.classifiers.to(images.device)
    optimiser = torch.optim.Adam(trainer.parameters(), lr=settings.learning_rate)
    steps_per_epoch = math.ceil(images.shape[0] / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    record = TrainingRecord()
    running: dict[str, float] = {}
    order = np.arange(images.shape[0])
    started = time.perf_counter()
    encoders.train()
    bar = tqdm(total=total_steps, desc="fit: training patch encoders", unit="step", disable=not progress)
    for step in range(total_steps):
        if time.perf_counter() - started > settings.max_train_seconds:
            record.stopped_by = "max_train_seconds"
            break
        if step % steps_per_epoch == 0:
            order = trainer.rng.permutation(images.shape[0])
        position = (step % steps_per_epoch) * settings.batch_size
        which = order[position : position + settings.batch_size]
        if len(which) < settings.batch_size:  # top up the last batch of an epoch
            which = np.concatenate([which, trainer.rng.choice(images.shape[0], settings.batch_size - len(which))])
        losses = trainer.losses(images, which)
        loss = trainer.total(losses)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        values = {name: float(value.detach()) for name, value in losses.items()} | {"total": float(loss.detach())}
        if record.first_losses is None:
            record.first_losses = values
        running = {name: value if not running else 0.9 * running[name] + 0.1 * value for name, value in values.items()}
        record.steps = step + 1
        bar.update(1)
        bar.set_postfix({name: f"{value:.3g}" for name, value in running.items()}, refresh=False)
    bar.close()
    encoders.eval()
    record.seconds = round(time.perf_counter() - started, 1)
    record.epochs = round(record.steps / steps_per_epoch, 2)
    record.final_losses = {name: round(value, 5) for name, value in running.items()}
    return record


# -- scoring ----------------------------------------------------------------------------------------------------


def strided_patches(dense: torch.Tensor, stride: int) -> torch.Tensor:
    """A dense map at pixel stride 2 ``(N, D, G, G)`` -> patches at pixel stride ``stride`` ``(N, D, P, P)``."""
    return dense[:, :, :: stride // 2, :: stride // 2]


def spread_to_cells(scores: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Patch scores ``(N, P, P)`` (patch i starts at pixel ``i * stride``) -> cell maps ``(N, P + K/s - 1, ...)``:
    each ``stride``-pixel cell gets the mean score of the patches covering it (the official distribute_scores)."""
    cover = patch_size // stride
    kernel = torch.ones(1, 1, cover, cover, dtype=scores.dtype)
    summed = F.conv_transpose2d(scores[:, None], kernel)
    counts = F.conv_transpose2d(torch.ones_like(scores[:1, None]), kernel)
    return (summed / counts)[:, 0]


class PatchSVDDMethod(AnomalyMethod):
    name: ClassVar[str] = "patchsvdd"

    def __init__(
        self,
        encoders: PatchEncoders,
        indexes: dict[int, NearestNeighbourIndex],
        banks: dict[int, np.ndarray],
        settings: PatchSVDDSettings,
        index_settings: IndexSettings,
        image_size: int,
        training: TrainingRecord,
    ) -> None:
        check_geometry(settings, image_size)
        if sorted(indexes) != list(encoders.patch_sizes) or sorted(banks) != list(encoders.patch_sizes):
            msg = f"need one bank and index per scale {encoders.patch_sizes}, got {sorted(banks)} / {sorted(indexes)}"
            raise ValueError(msg)
        for size, index in indexes.items():
            if index.dimension != encoders.dim or banks[size].shape[1] != encoders.dim:
                msg = f"scale {size}: bank/index dimension differs from the encoders' {encoders.dim}"
                raise ValueError(msg)
        self.encoders = encoders.eval()
        self.indexes = indexes
        self.banks = banks
        self.settings = settings
        self.index_settings = index_settings
        self.image_size = image_size
        self.training = training

    @property
    def normalised(self) -> bool:
        """The multiscale variant learns cosine similarities: its embeddings are compared on the unit sphere."""
        return self.settings.variant == "multiscale"

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> PatchSVDDMethod:
        settings = config.patchsvdd
        image_size = config.model.image_size
        check_geometry(settings, image_size)
        torch.manual_seed(settings.seed)
        encoders = PatchEncoders(patch_sizes(settings), settings.embedding_dim).to(device)
        images = _load_uint8(batches, progress).to(device)
        encoders.channel_mean.copy_(images.float().mean(dim=(0, 2, 3)) / 255.0)
        training = train_encoders(encoders, images, settings, progress)
        banks = _build_banks(encoders, images, settings, progress)
        del images
        use_gpu = config.index.use_gpu == "auto" and device.type == "cuda"
        indexes = {size: _index(bank, config.index, use_gpu) for size, bank in banks.items()}
        return cls(encoders, indexes, banks, settings, config.index, image_size, training)

    @torch.inference_mode()
    def embed(self, views: torch.Tensor) -> list[torch.Tensor]:
        """Views ``(V, 3, S, S)``, clamped to [0, 1] as the training images were -> per scale, patches at the scoring
        stride ``(V, D, P, P)`` on the CPU."""
        device = self.encoders.channel_mean.device
        dense = self.encoders.dense(self.encoders.standardise(views.to(device).clamp(0.0, 1.0)))
        patches = [strided_patches(m, self.settings.stride).float().cpu() for m in dense]
        return [F.normalize(p, dim=1) for p in patches] if self.normalised else patches

    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        per_scale = self.embed(views)
        embedded = time.perf_counter()
        combined: torch.Tensor | None = None
        for size, patches in zip(self.encoders.patch_sizes, per_scale, strict=True):
            view_count, dim, grid, _ = patches.shape
            queries = patches.permute(0, 2, 3, 1).reshape(-1, dim).numpy()
            distances, _ = self.indexes[size].search(queries, 1)
            scores = torch.from_numpy(distances[:, 0].copy()).view(view_count, grid, grid)
            cells = spread_to_cells(scores, size, self.settings.stride)
            combined = cells if combined is None else combined * cells
        assert combined is not None
        searched = time.perf_counter()
        return MethodOutput(combined.float(), None, embedded - started, searched - embedded)

    def save(self, model_dir: Path) -> dict[str, Any]:
        torch.save(self.encoders.state_dict(), model_dir / ENCODERS_FILE)
        files = [ENCODERS_FILE]
        for size in self.encoders.patch_sizes:
            np.save(model_dir / bank_file(size), self.banks[size], allow_pickle=False)
            self.indexes[size].save(model_dir / index_file(size))
            files += [bank_file(size), index_file(size)]
        return {
            "settings": self.settings.model_dump(mode="json"),
            "index": self.index_settings.model_dump(mode="json"),
            "image_size": self.image_size,
            "patch_sizes": list(self.encoders.patch_sizes),
            "bank_rows": {str(size): int(bank.shape[0]) for size, bank in self.banks.items()},
            "training": asdict(self.training),
            "files": files,
        }

    @classmethod
    def load(
        cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device
    ) -> PatchSVDDMethod:
        try:
            settings = PatchSVDDSettings.model_validate(section["settings"])
            index_settings = IndexSettings.model_validate(section["index"])
            if section["image_size"] != model.image_size:
                msg = f"fitted at {section['image_size']} px but the model settings say {model.image_size} px"
                raise ValueError(msg)
            encoders = PatchEncoders(patch_sizes(settings), settings.embedding_dim)
            state = torch.load(model_dir / ENCODERS_FILE, map_location="cpu", weights_only=True)
            encoders.load_state_dict(state)
            use_gpu = index_settings.use_gpu == "auto" and device.type == "cuda"
            banks, indexes = {}, {}
            for size in encoders.patch_sizes:
                banks[size] = np.load(model_dir / bank_file(size), allow_pickle=False)
                indexes[size] = NearestNeighbourIndex.load(
                    model_dir / index_file(size), index_settings.kind, use_gpu, index_settings.ivf_probe
                )
            training = TrainingRecord(**section["training"])
            return cls(encoders.to(device), indexes, banks, settings, index_settings, model.image_size, training)
        except (KeyError, TypeError, ValueError, RuntimeError, OSError, IndexError_) as error:
            msg = f"{model_dir}: cannot rebuild the Patch SVDD model: {error}"
            raise ArtifactError(msg) from None

    def describe(self) -> str:
        scales = "+".join(str(size) for size in self.encoders.patch_sizes)
        rows = "+".join(str(self.banks[size].shape[0]) for size in self.encoders.patch_sizes)
        return (f"{self.settings.variant} {scales} px encoders (D={self.encoders.dim}, {self.training.steps} steps), "
                f"banks {rows}")  # fmt: skip


def check_geometry(settings: PatchSVDDSettings, image_size: int) -> None:
    if image_size < 2 * settings.patch_size:
        msg = (f"model.image_size {image_size} is too small for {settings.patch_size}-px patches: the position task "
               f"needs at least {2 * settings.patch_size} px")  # fmt: skip
        raise ValueError(msg)
    if image_size % settings.stride:
        msg = f"model.image_size {image_size} must be a multiple of patchsvdd.stride {settings.stride}"
        raise ValueError(msg)


def _load_uint8(batches: ImageBatches, progress: bool) -> torch.Tensor:
    """All good images as uint8 ``(N, 3, S, S)`` (a quarter of the float memory), clamped to [0, 1] first like the
    views at scoring (standardised frames reach beyond it in their tails; uint8 would wrap them around)."""
    loaded = []
    bar = tqdm(total=batches.images, desc="fit: reading good images", unit="img", disable=not progress)
    for batch in batches:
        loaded.append(batch.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8))
        bar.update(batch.shape[0])
    bar.close()
    return torch.cat(loaded)


def _build_banks(
    encoders: PatchEncoders, images: torch.Tensor, settings: PatchSVDDSettings, progress: bool
) -> dict[int, np.ndarray]:
    """Per scale, ``bank_rows`` training patch embeddings at the scoring stride: an equal random quota per image."""
    rng = np.random.default_rng(settings.seed)
    quota = math.ceil(settings.bank_rows / images.shape[0])
    collected: dict[int, list[np.ndarray]] = {size: [] for size in encoders.patch_sizes}
    bar = tqdm(total=images.shape[0], desc="fit: embedding the bank", unit="img", disable=not progress)
    normalise = settings.variant == "multiscale"
    with torch.inference_mode():
        for start in range(0, images.shape[0], 8):
            chunk = images[start : start + 8].float().div_(255.0)
            dense = encoders.dense(encoders.standardise(chunk))
            for size, full in zip(encoders.patch_sizes, dense, strict=True):
                patches = strided_patches(full, settings.stride).float().cpu()
                if normalise:
                    patches = F.normalize(patches, dim=1)
                rows = patches.permute(0, 2, 3, 1).reshape(patches.shape[0], -1, patches.shape[1]).numpy()
                for image_rows in rows:
                    keep = rng.choice(image_rows.shape[0], min(quota, image_rows.shape[0]), replace=False)
                    collected[size].append(image_rows[np.sort(keep)])
            bar.update(chunk.shape[0])
    bar.close()
    banks = {}
    for size, parts in collected.items():
        bank = np.concatenate(parts)
        if bank.shape[0] > settings.bank_rows:
            bank = bank[np.sort(rng.choice(bank.shape[0], settings.bank_rows, replace=False))]
        banks[size] = np.ascontiguousarray(bank, dtype=np.float32)
    return banks


def _index(bank: np.ndarray, settings: IndexSettings, use_gpu: bool) -> NearestNeighbourIndex:
    return NearestNeighbourIndex.build(bank, settings.kind, use_gpu, settings.ivf_lists, settings.ivf_probe,
                                       settings.hnsw_neighbors)  # fmt: skip
