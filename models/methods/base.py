"""The contract every anomaly-detection method fulfils, so one Scorer, artifact, CLI and worker serve them all.

A method turns a batch of preprocessed views ``(V, 3, S, S)`` (floats, V = frames x shifted views; in [0, 1] for raw
frames, mean 0.449 and standard deviation 0.226 per frame when standardised, ``[model] intensity``) into
patch anomaly maps ``(V, h, w)`` on its own grid, and optionally its own image-level scores ``(V,)``. Everything
around that is shared and lives in ``models.scorer``: resizing, N-pad shifted views and their alignment, upsampling
to ``(S, S)``, Gaussian smoothing, image scores from the map (top-k mean or max) when the method has none of its
own, thresholds and verdicts.

A method is fitted on good images only (``fit``), writes its state as plain files (``save``: ``.npy`` without
pickle, faiss indexes, torch state dicts read back with ``weights_only=True``) and reads them back (``load``).
The artifact (``models.artifact``) hashes every file a method lists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from pipeline.config import Config, ModelSettings, ScoringSettings


class MethodOutput(NamedTuple):
    patch_maps: torch.Tensor  # (V, h, w) float32 on the CPU: higher = more anomalous
    view_scores: torch.Tensor | None  # (V,) the method's own image score per view, or None: taken from the map
    embed_s: float  # seconds spent computing features (backbone, encoder)
    search_s: float  # seconds spent comparing them with the model of normality (kNN, Mahalanobis)


class ImageBatches(Protocol):
    """Good training images, re-iterable: each pass yields ``(B, 3, S, S)`` float batches, preprocessed as views are."""

    @property
    def images(self) -> int:
        """How many images one pass yields (for progress bars)."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...


class AnomalyMethod(ABC):
    """One method's fitted state and its scoring step. Subclasses read top to bottom as their paper does."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def fit(cls, batches: ImageBatches, config: Config, device: torch.device, progress: bool) -> AnomalyMethod:
        """Learn normality from good images; long work shows a progress bar when ``progress``."""

    @abstractmethod
    def score_views(self, views: torch.Tensor, scoring: ScoringSettings) -> MethodOutput:
        """``(V, 3, S, S)`` -> patch maps ``(V, h, w)`` (+ optional image scores ``(V,)``)."""

    @abstractmethod
    def save(self, model_dir: Path) -> dict[str, Any]:
        """Write state files into ``model_dir``; return the JSON manifest section, with ``files``: names written."""

    @classmethod
    @abstractmethod
    def load(
        cls, model_dir: Path, section: dict[str, Any], model: ModelSettings, device: torch.device
    ) -> AnomalyMethod:
        """Rebuild from ``save``'s files and manifest section (which holds the method's own settings); raise
        ``ArtifactError`` when they do not fit together."""

    @abstractmethod
    def describe(self) -> str:
        """One line for people: what was fitted (e.g. 'compressed bank 6272 x 152')."""
