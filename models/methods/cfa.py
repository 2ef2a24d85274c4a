"""CFA: Coupled-hypersphere-based Feature Adaptation (Lee et al. 2022): a trained patch descriptor over frozen features.

Fit, top to bottom:

1. Every good image -> frozen locally aware patch features ``(C, h, w)`` (``models.features``, as PatchCore), cached
   once ``(N, C, h, w)``: the backbone is frozen, so each epoch only runs the small head.
2. Patch descriptor: a 1x1 convolution ``C [+ 2 coordinate channels] -> D = C / reduction`` (CFA's gamma_d;
   ``PatchDescriptor``). Initialised with orthonormal rows and zero weights on the coordinates, so the untrained
   descriptor is a rotation (``reduction = 1``) or a random orthogonal projection of the features: distances start
   out as the frozen features' own, and ``epochs = 0`` is the untrained kNN baseline in the same code path.
3. Memory bank in the descriptor space: the core's compressed bank (``models.memory_bank``: k-means init +
   running-mean/EMA steps; rows = ``[bank] compression_ratio`` x one image's ``h * w`` patches, independent of the
   training-set size), whatever ``[bank] kind`` says (that picks PatchCore's bank). Built from the *initial* head's
   output and kept fixed during training, as CFA does. A fixed bank is the target the loss is defined against:
   rebuilding it from the moving descriptors would let the head shrink descriptors and bank together (the
   attraction term's trivial minimum), and rebuilding once after training would score with entries the head was
   never trained towards.
4. Training (``train_descriptor``): for each patch descriptor ``phi``, its ``K`` nearest bank entries and the next
   ``J`` (hard negatives), found with faiss on the detached descriptors; squared distances ``d^2`` to them get the
   coupled-hypersphere loss (``coupled_hypersphere_loss``)

       attraction = mean relu(d^2(phi, c_k) - r^2)            k = 1..K   (pull inside the radius r)
       repulsion  = mean relu(r^2 - d^2(phi, c_j) + alpha)    j = K+1..K+J (push beyond r^2 + alpha)

   AdamW with AMSGrad (lr 1e-3, weight decay 5e-4, the official code's optimiser), images shuffled each epoch.
   The budget is fixed: ``epochs`` AND ``max_train_seconds``; the head after the last step is kept. No epoch is ever
   selected on test results (the official code picks its best epoch on the test set).
   Why 5 epochs (the default): on the validation split carved from MTD's training images with synthetic defects
   (never test images), image AUROC (top-10) after epochs 0..10 was 90.2, 92.2, 90.6, 93.3, 94.3, 94.3, 94.4, 93.1,
   92.2, 90.9, 90.4 and pixel AUROC 98.4 at 0, 98.4-98.6 at 4-6, 96.5 at 10. The repulsion term stayed 0 all along:
   with these features the next entries lie tens to hundreds of squared units away, never within
   ``r^2 + alpha = 0.1``, so nothing resists the attraction contracting every descriptor (anomalous ones too)
   towards the bank; by epoch 10 the descriptors' spread had fallen to 6% of its initial value.
   Differences from the official code, on purpose: ``r`` is fixed (the official ``r`` is a learnable parameter
   initialised to 1e-5), and the repulsion margin is added (``+ alpha``, as this project's brief specifies); the
   official ``relu(r^2 - d^2 - alpha)`` is zero for every ``d`` while ``r^2 < alpha``, i.e. it only repels once
   the learnt ``r`` has grown past ``sqrt(alpha)``.

Score: views ``(V, 3, S, S)`` -> one backbone call -> descriptors ``(V * h * w, D)`` -> one faiss search of the ``K``
nearest entries -> squared distances ``(V * h * w, K)`` -> nearest squared distance times its softmin weight over
the ``K`` (CFA's certainty: a normal patch between several close entries is down-weighted) -> patch maps
``(V, h, w)``. The image score comes from the map (``[scoring] image_score``: top-k mean or max).

Files: ``descriptor.pt`` (the head's state dict, read back with ``weights_only=True``), ``bank.npy`` (rows, D)
float32 and ``index.faiss``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.errors import ArtifactError
from models.features import PatchFeatureExtractor, flatten_patches
from models.index import IndexError_, NearestNeighbourIndex
from models.memory_bank import CompressedBankBuilder, MemoryBank, MemoryBankError
from models.methods.base import AnomalyMethod, ImageBatches, MethodOutput
from models.methods.patchcore import build_extractor, embed, load_extractor
from pipeline.config import BankSettings, CFASettings, Config, IndexSettings, ModelSettings, ScoringSettings

HEAD_FILE = "descriptor.pt"
BANK_FILE = "bank.npy"
INDEX_FILE = "index.faiss"
COORDINATE_CHANNELS = 2


class PatchDescriptor(nn.Module):
    """CFA's patch descriptor: ``(B, C, h, w)`` features -> ``(B, D, h, w)`` descriptors by a 1x1 convolution,
    optionally over two extra channels holding each position's (y, x) in [-1, 1] (CoordConv)."""

    def __init__(self, in_channels: int, out_channels: int, coord_conv: bool, generator: torch.Generator | None = None):
        super().__init__()
        if not 0 < out_channels <= in_channels:
            msg = f"descriptor channels must be in 1..{in_channels} (the feature channels), got {out_channels}"
            raise ValueError(msg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.coord_conv = coord_conv
        extra = COORDINATE_CHANNELS if coord_conv else 0
        self.projection = nn.Conv2d(in_channels + extra, out_channels, kernel_size=1)
        weight = torch.zeros(out_channels, in_channels + extra)
        nn.init.orthogonal_(weight[:, :in_channels], generator=generator)  # orthonormal rows: distances kept (D = C)
        self.projection.weight = nn.Parameter(weight[:, :, None, None].clone())
        self.projection.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.coord_conv:
            batch, _, height, width = features.shape
            ys = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=features.dtype)
            xs = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=features.dtype)
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, h, w)
            features = torch.cat([features, grid.expand(batch, -1, -1, -1)], dim=1)
        descriptors: torch.Tensor = self.projection(features)
        return descriptors


class LossTerms(NamedTuple):
    attraction: torch.Tensor  # scalar
    repulsion: torch.Tensor  # scalar

    @property
    def total(self) -> torch.Tensor:
        return self.attraction + self.repulsion


def coupled_hypersphere_loss(
    descriptors: torch.Tensor, entries: torch.Tensor, attract: int, radius: float, margin: float
) -> LossTerms:
    """CFA's loss. ``descriptors (P, D)``; ``entries (P, K + J, D)``: each descriptor's nearest bank entries, nearest
    first; the first ``attract`` (K) are pulled within ``radius``, the rest (J hard negatives) pushed beyond
    ``radius^2 + margin`` in squared distance. Means over patches and entries."""
    squared = (descriptors[:, None, :] - entries).pow(2).sum(dim=2)  # (P, K + J)
    radius_sq = radius * radius
    attraction = F.relu(squared[:, :attract] - radius_sq).mean()
    negatives = squared[:, attract:]
    repulsion = F.relu(radius_sq - negatives + margin).mean() if negatives.shape[1] else squared.new_zeros(())
    return LossTerms(attraction, repulsion)


def certainty_scores(squared: torch.Tensor) -> torch.Tensor:
    """``(P, K)`` squared distances to the K nearest entries, nearest first -> ``(P,)`` patch scores: the nearest
    squared distance times its softmin weight among the K (1 when it stands out, 1/K when all K are equally near)."""
    return squared[:, 0] * torch.softmax(-squared, dim=1)[:, 0]


@dataclass
class TrainingRecord:
    """What training did, for the manifest: its budget, where it stopped and the loss per finished epoch."""

    epochs: int
    max_train_seconds: float
    epochs_finished: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "epochs"  # "epochs" or "time"
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each finished epoch


def cache_features(extractor: PatchFeatureExtractor, batches: ImageBatches, progress: bool) -> torch.Tensor:
    """Frozen patch features of every good image, ``(N, C, h, w)`` float32 on the CPU."""
    chunks: list[torch.Tensor] = []
    bar = tqdm(total=batches.images, desc="fit: embedding good images", unit="img", disable=not progress)
    for batch in batches:
        chunks.append(embed(extractor, batch))
        bar.update(batch.shape[0])
    bar.close()
    if not chunks:
        msg = "no training images to fit CFA on"
        raise ValueError(msg)
    return torch.cat(chunks)


@torch.no_grad()
def build_bank(head: PatchDescriptor, features: torch.Tensor, settings: BankSettings) -> MemoryBank:
    """The compressed bank over ``head``'s descriptors of ``features (N, C, h, w)``, one image at a time.

    CFA's bank is always the compressed one (its paper's); ``[bank] kind`` chooses PatchCore's bank and is not read
    here, the compressed bank's own settings (``compression_ratio``, ``ema_momentum``, ...) are."""
    patches_per_image = features.shape[2] * features.shape[3]
    builder = CompressedBankBuilder(
        patches_per_image, settings.compression_ratio, settings.ema_momentum, settings.kmeans_iterations,
        settings.init_images, settings.seed,
    )  # fmt: skip
    device = next(head.parameters()).device
    for image_features in features:
        descriptors = head(image_features[None].to(device))
        builder.add_image(flatten_patches(descriptors).cpu().numpy())
    return builder.finish()


def _neighbour_entries(
    descriptors: torch.Tensor, index: NearestNeighbourIndex, bank: torch.Tensor, count: int
) -> torch.Tensor:
    """``(P, count, D)`` bank entries nearest to each descriptor ``(P, D)``, nearest first (search without grad)."""
    _, neighbours = index.search(descriptors.detach().cpu().numpy(), count)
    return bank[torch.from_numpy(neighbours).to(bank.device)]


def dataset_loss(
    head: PatchDescriptor, features: torch.Tensor, bank: MemoryBank, settings: CFASettings, chunk: int = 16
) -> LossTerms:
    """The loss of ``head`` over all patches of ``features (N, C, h, w)`` (patch-weighted mean), without grad."""
    device = next(head.parameters()).device
    index = NearestNeighbourIndex.build(bank.features)
    entries_bank = torch.from_numpy(bank.features).to(device)
    attract, count = _neighbour_counts(settings, bank.rows)
    attraction = repulsion = 0.0
    with torch.no_grad():
        for start in range(0, features.shape[0], chunk):
            descriptors = flatten_patches(head(features[start : start + chunk].to(device)))
            terms = coupled_hypersphere_loss(descriptors, _neighbour_entries(descriptors, index, entries_bank, count),
                                             attract, settings.radius, settings.margin)  # fmt: skip
            weight = descriptors.shape[0]
            attraction += float(terms.attraction) * weight
            repulsion += float(terms.repulsion) * weight
    total = features.shape[0] * features.shape[2] * features.shape[3]
    return LossTerms(torch.tensor(attraction / total), torch.tensor(repulsion / total))


def _neighbour_counts(settings: CFASettings, rows: int) -> tuple[int, int]:
    """``(K, K + J)`` limited to the bank's rows (a tiny bank from a handful of images may hold fewer)."""
    attract = min(settings.attract_neighbors, rows)
    return attract, min(attract + settings.repel_neighbors, rows)


def train_descriptor(
    head: PatchDescriptor,
    features: torch.Tensor,
    bank: MemoryBank,
    settings: CFASettings,
    progress: bool,
    on_epoch: Callable[[int, PatchDescriptor], None] | None = None,
) -> TrainingRecord:
    """Train ``head`` in place on cached ``features (N, C, h, w)`` against the fixed ``bank``, within the budget.
    ``on_epoch(epochs_finished, head)`` is called after each finished epoch (for monitoring on held-out data)."""
    record = TrainingRecord(settings.epochs, settings.max_train_seconds)
    if settings.epochs == 0:
        return record
    device = next(head.parameters()).device
    index = NearestNeighbourIndex.build(bank.features)
    entries_bank = torch.from_numpy(bank.features).to(device)
    attract, count = _neighbour_counts(settings, bank.rows)
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  amsgrad=True)  # fmt: skip
    generator = torch.Generator().manual_seed(settings.seed)
    images = features.shape[0]
    steps_per_epoch = -(-images // settings.batch_images)
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc="fit: training CFA descriptor", unit="step",
               disable=not progress)  # fmt: skip
    started = time.perf_counter()
    head.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(images, generator=generator)
        loss_sum, patch_count = 0.0, 0
        for start in range(0, images, settings.batch_images):
            descriptors = flatten_patches(head(features[order[start : start + settings.batch_images]].to(device)))
            entries = _neighbour_entries(descriptors, index, entries_bank, count)
            loss = coupled_hypersphere_loss(descriptors, entries, attract, settings.radius, settings.margin).total
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            record.steps += 1
            loss_sum += float(loss.detach()) * descriptors.shape[0]
            patch_count += descriptors.shape[0]
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / patch_count:.4g}")
            if time.perf_counter() - started > settings.max_train_seconds:
                record.stopped_by = "time"
                break
        if record.stopped_by == "time":
            break
        record.epochs_finished += 1
        record.epoch_losses.append(round(loss_sum / patch_count, 6))
        if on_epoch is not None:
            head.eval()
            on_epoch(record.epochs_finished, head)
            head.train()
    bar.close()
    head.eval()
    record.seconds = round(time.perf_counter() - started, 3)
    return record


class CFAMethod(AnomalyMethod):
    name: ClassVar[str] = "cfa"

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        head: PatchDescriptor,
        bank: MemoryBank,
        index: NearestNeighbourIndex,
        settings: CFASettings,
        bank_settings: BankSettings,
        index_settings: IndexSettings,
        image_size: int,
        training: TrainingRecord,
    ) -> None:
        if not head.out_channels == bank.channels == index.dimension:
            msg = (f"descriptor has {head.out_channels} channels, the bank {bank.channels} and the index "
                   f"{index.dimension}: they must agree")  # fmt: skip
            raise ValueError(msg)
        self.extractor = extractor
        self.head = head.eval()
        self.bank = bank
        self.index = index
        self.settings = settings
        self.bank_settings = bank_settings
        self.index_settings = index_settings
        self.image_size = image_size
        self.training = training

    @classmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> CFAMethod:
        settings = config.cfa
        extractor = build_extractor(config.model, device)
        features = cache_features(extractor, batches, progress)
        channels = features.shape[1]
        generator = torch.Generator().manual_seed(settings.seed)
        head = PatchDescriptor(channels, max(1, channels // settings.reduction), settings.coord_conv, generator)
        head = head.to(device).eval()
        bank = build_bank(head, features, config.bank)
        training = train_descriptor(head, features, bank, settings, progress)
        use_gpu = config.index.use_gpu == "auto" and device.type == "cuda"
        index = NearestNeighbourIndex.build(
            bank.features, config.index.kind, use_gpu, config.index.ivf_lists, config.index.ivf_probe,
            config.index.hnsw_neighbors,
        )  # fmt: skip
        return cls(extractor, head, bank, index, settings, config.bank, config.index, config.model.image_size,
                   training)  # fmt: skip

    @torch.inference_mode()
    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        started = time.perf_counter()
        features = embed(self.extractor, views)
        device = next(self.head.parameters()).device
        descriptors = self.head(features.to(device)).float().cpu()
        view_count, _, grid_h, grid_w = descriptors.shape
        embedded = time.perf_counter()
        distances, _ = self.index.search(flatten_patches(descriptors).numpy(), self.settings.attract_neighbors)
        squared = torch.from_numpy(distances).pow(2)
        patch_scores = certainty_scores(squared)
        searched = time.perf_counter()
        return MethodOutput(patch_scores.view(view_count, grid_h, grid_w), None, embedded - started,
                            searched - embedded)  # fmt: skip

    def save(self, model_dir: Path) -> dict[str, Any]:
        torch.save(self.head.state_dict(), model_dir / HEAD_FILE)
        self.bank.save(model_dir / BANK_FILE)
        self.index.save(model_dir / INDEX_FILE)
        channels, grid_h, grid_w = self.extractor.output_shape(self.image_size)
        return {
            "cfa": self.settings.model_dump(mode="json"),
            "descriptor": {
                "in_channels": self.head.in_channels,
                "out_channels": self.head.out_channels,
                "coord_conv": self.head.coord_conv,
            },
            "bank": self.bank_settings.model_dump(mode="json") | {"rows": self.bank.rows, "kind": self.bank.kind},
            "index": self.index_settings.model_dump(mode="json"),
            "layers": list(self.extractor.backbone.layers),
            "features": {"channels": channels, "grid": [grid_h, grid_w]},
            "training": dataclasses.asdict(self.training),
            "files": [HEAD_FILE, BANK_FILE, INDEX_FILE],
        }

    @classmethod
    def load(cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device) -> CFAMethod:
        try:
            settings = CFASettings.model_validate(section["cfa"])
            bank_settings = BankSettings.model_validate({k: v for k, v in section["bank"].items() if k != "rows"})
            index_settings = IndexSettings.model_validate(section["index"])
            training = TrainingRecord(**section["training"])
            shape = section["descriptor"]
            head = PatchDescriptor(int(shape["in_channels"]), int(shape["out_channels"]), bool(shape["coord_conv"]))
            state = torch.load(model_dir / HEAD_FILE, map_location="cpu", weights_only=True)
            try:
                head.load_state_dict(state)
            except RuntimeError as error:  # missing keys or shapes other than the manifest's descriptor
                msg = f"{HEAD_FILE} does not fit the descriptor {shape} recorded in the manifest: {error}"
                raise ValueError(msg) from None
            bank = MemoryBank.load(model_dir / BANK_FILE, section["bank"]["kind"])
            use_gpu = index_settings.use_gpu == "auto" and device.type == "cuda"
            index = NearestNeighbourIndex.load(
                model_dir / INDEX_FILE, index_settings.kind, use_gpu, index_settings.ivf_probe
            )
        except (KeyError, TypeError, MemoryBankError, IndexError_, ValueError, OSError) as error:
            msg = f"{model_dir}: {error}"
            raise ArtifactError(msg) from None
        consumer = f"descriptor expects {head.in_channels} channels"
        extractor = load_extractor(model_dir, section, model, device, consumer, head.in_channels)
        if not head.out_channels == bank.channels == index.dimension:
            msg = (f"{model_dir}: descriptor gives {head.out_channels} channels, bank.npy has {bank.channels}, "
                   f"index.faiss {index.dimension}: files from different models")  # fmt: skip
            raise ArtifactError(msg)
        return cls(extractor, head.to(device), bank, index, settings, bank_settings, index_settings,
                   model.image_size, training)  # fmt: skip

    def describe(self) -> str:
        coords = " + coords" if self.head.coord_conv else ""
        return (f"CFA descriptor {self.head.in_channels}{coords} -> {self.head.out_channels}, "
                f"{self.bank.kind} bank {self.bank.rows} x {self.bank.channels}, "
                f"{self.training.epochs_finished} epochs ({self.training.steps} steps)")  # fmt: skip
