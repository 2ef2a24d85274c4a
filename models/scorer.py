"""Scorer: frames in, image scores and per-pixel anomaly maps out, whatever the method.

``Scorer.score(images)`` reads top to bottom:

1. ``preprocess``: each frame (any size, grayscale/RGB/RGBA, 8/16-bit) -> RGB, resized to ``(S, S)`` (stretched,
   or with ``[model] resize = "pad"`` scaled keeping its aspect and padded, or with ``"tile"`` cut into
   near-square pieces each stretched, ``models.tiling``), by default with its brightness and contrast
   standardised (``[model] intensity``); batch ``(N, 3, S, S)`` floats (``(T, 3, S, S)``, T pieces, when tiling).
   With an inspection mask (``[model] inspection_mask``, ``models.inspection_mask``) ignored pixels end flat grey.
2. N-pad shifting: ``(N * V, 3, S, S)``, V views per frame (V = 1 when shifting is off). With a threshold, only
   the frames that fail unshifted are shifted (``[scoring] shift_only_failing``, ``Scorer.score``).
3. The method (``models.methods``; PatchCore by default: one backbone call, one index search for the whole batch)
   -> patch maps ``(N * V, h, w)`` and, for methods with their own image score, view scores ``(N * V,)``.
4. Maps upsampled to ``(S, S)``, shifted views aligned back and aggregated per pixel, padding cropped off (each map
   covers its whole frame, stretched to the square, whatever the resize mode) -> ``(N, S, S)``; with
   position statistics (``models.normalisation``, fitted on held-out good images) turned into per-pixel z-scores;
   when tiling, pieces stitched into their frames; Gaussian-smoothed (sigma 4; with an inspection mask over
   inspected pixels only, ignored ones set to their frame's lowest inspected value).
5. Image score ``(N,)``: the method's own (aggregated over views like the maps), else the mean of the ``top_k``
   highest patch scores (default; chosen on a validation split of MTD training images with synthetic defects, where
   it beat the map's maximum: 0.913 vs 0.859 image AUROC) or the smoothed map's maximum; with an inspection mask,
   of inspected patch cells and pixels only.
6. Fusion (``[fusion] members``): companion Scorers, each a fitted method with its own settings and position
   statistics, score the same views (steps 3-5; backbones with the same weights run once when one's layers lie
   within the other's pass, see ``models.backbones.shared_backbone_pass``), or, for a companion with its own
   ``image_size`` (the default's coarser PaDiM, ``pipeline.config.recommended_companions``), views of the frames
   at that size, its maps ``(N, s, s)`` resized to ``(N, S, S)``; scores and maps are the mean over this Scorer
   and its companions, all in z units. The threshold applies to the fused score.
7. Optionally (``[scoring] map_baseline = "median"``, off by default) heatmaps relative to their frame: each map
   less its own median (with an inspection mask, over inspected pixels; taken in the good frames' pose when
   registered), so a frame whose whole map sits higher does not outrank other frames' defect-free pixels; it
   flattens defects covering much of the frame. Scores and verdicts come from steps 5-6, unaffected.

With an inspection mask, frames of another aspect than the mask's are refused (``aspect_mismatch``): stretched over
them, the mask would inspect the wrong places.

Returns a typed ``ScoreBatch(scores, maps, timings, shifted)``. Models never do I/O here; see ``models.artifact``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.backbones import shared_backbone_pass
from models.images import to_rgb
from models.inspection_mask import InspectionMask, apply_to_inputs, input_shares
from models.methods.base import AnomalyMethod, MethodOutput
from models.normalisation import PositionStats
from models.registration import Registration
from models.shifting import aggregate_view_scores, align_and_aggregate, shift_offsets, shifted_views
from models.tiling import frame_tiles, split_by_frame, stitch_tiles
from pipeline.config import SHARED_SCORING_KEYS, IntensitySetting, ModelSettings, Resize, ScoringSettings


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent on the whole batch in each stage."""

    backbone_s: float
    search_s: float
    postprocess_s: float


class ScoreBatch(NamedTuple):
    scores: np.ndarray  # (N,) float32
    maps: np.ndarray  # (N, S, S) float32
    timings: StageTimings
    shifted: np.ndarray  # (N,) bool: the frame's score and map are from shifted views (N-pad shifting)
    unregistered: np.ndarray | None = None  # (N,) bool: a registered model could not register the frame; None: the
    # model does not register frames (models.registration)


@dataclass(frozen=True)
class Threshold:
    """Pass/fail threshold on the image score and how it was chosen."""

    value: float
    method: str  # "false_reject_rate" or "manual"
    false_reject_rate: float | None = None
    good_images: int = 0
    best_f1_value: float | None = None


@dataclass(frozen=True)
class TrainingSummary:
    images: int
    skipped: list[str] = field(default_factory=list)
    source: str = ""
    fit_seconds: float = 0.0
    intensity_choice: str = ""  # how [model] intensity = "auto" was resolved (models.intensity), else ""
    registration_choice: str = ""  # whether frames are registered and why (models.registration), else ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'"
        raise RuntimeError(msg)
    return torch.device(device)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian ``(2 * round(4 * sigma) + 1,)`` summing to 1."""
    radius = int(4.0 * sigma + 0.5)
    positions = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` float32 maps with reflected borders (the edge pixel not repeated),
    returned on the CPU. OpenCV's separable filter: 4x as fast as torch's single-channel convolutions (1.8 against
    7.2 ms for 8 maps of 224 px at sigma 4, the same values to 4e-7)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).double().numpy()
    source = np.ascontiguousarray(maps.detach().cpu().numpy(), dtype=np.float32)
    blurred = np.empty_like(source)
    for position, frame_map in enumerate(source):
        cv2.sepFilter2D(frame_map, -1, kernel, kernel, dst=blurred[position], borderType=cv2.BORDER_REFLECT_101)
    return torch.from_numpy(blurred)


def content_box(height: int, width: int, image_size: int, resize: Resize = "stretch") -> tuple[int, int, int, int]:
    """Where a ``height x width`` frame lands in the ``(S, S)`` input: ``(top, left, box height, box width)``."""
    if resize != "pad":
        return 0, 0, image_size, image_size
    scale = image_size / max(height, width)
    box_h, box_w = max(1, min(image_size, round(height * scale))), max(1, min(image_size, round(width * scale)))
    return (image_size - box_h) // 2, (image_size - box_w) // 2, box_h, box_w


STANDARD_MEAN, STANDARD_STD = 0.449, 0.226  # ImageNet's pixel mean and standard deviation, averaged over channels


def preprocess(
    images: Sequence[np.ndarray],
    image_size: int,
    resize: Resize = "stretch",
    intensity: IntensitySetting = "raw",
    mask: InspectionMask | None = None,
) -> torch.Tensor:
    """Frames -> ``(T, 3, S, S)`` float32, in [0, 1] when ``intensity="raw"``; ``T = N`` unless ``resize="tile"``,
    then the frames' pieces in order (``models.tiling``).

    Frames are RGB of any depth ``models.images.to_rgb`` accepts; 16-bit ones are scaled by 1/257 in floats, so
    10- to 14-bit camera data keeps its grey levels (8-bit frames are computed exactly as they always were).
    ``resize="pad"`` keeps each frame's aspect (``content_box``). ``intensity="standardise"`` shifts and scales each
    frame (all channels alike, so colours keep their balance; all of a frame's pieces alike) to mean
    ``STANDARD_MEAN`` and standard deviation ``STANDARD_STD`` over its content: exposure and gain differences
    between frames no longer reach the features. ``intensity="auto"`` is an error: fitting resolves it
    (``models.intensity``) and models store the result. With an inspection ``mask`` (``models.inspection_mask``;
    not when tiling) the standardisation looks at inspected pixels only and the ignored ones end flat grey.
    """
    if intensity == "auto":
        msg = "intensity 'auto' must be resolved to 'raw' or 'standardise' when fitting (models/intensity.py)"
        raise ValueError(msg)
    if mask is not None and resize == "tile":
        msg = "an inspection mask cannot be used with resize 'tile' (pieces of frames of any length)"
        raise ValueError(msg)
    resized: list[np.ndarray] = []
    boxes: list[tuple[int, int, int, int]] = []
    frame_rows: list[list[int]] = []
    grey_levels: list[float] = []  # one grey level of each frame's depth, in [0, 1] units
    for position, image in enumerate(images):
        rgb = to_rgb(image, f"image {position}")
        grey_levels.append(1.0 / 255.0 if rgb.dtype == np.uint8 else 1.0 / 65535.0)
        frame_rows.append([])
        for piece in frame_tiles(rgb) if resize == "tile" else [rgb]:
            top, left, box_h, box_w = content_box(piece.shape[0], piece.shape[1], image_size, resize)
            interpolation = cv2.INTER_AREA if piece.shape[0] > box_h or piece.shape[1] > box_w else cv2.INTER_LINEAR
            scaled = cv2.resize(piece, (box_w, box_h), interpolation=interpolation)
            if scaled.dtype == np.uint16:  # on the 8-bit scale in floats (resized first: a fraction of the memory)
                scaled = scaled.astype(np.float32) / np.float32(257.0)
            if (box_h, box_w) != (image_size, image_size):
                canvas = np.empty((image_size, image_size, 3), scaled.dtype)
                fill = scaled.reshape(-1, 3).mean(axis=0)
                canvas[:] = fill.round().astype(np.uint8) if scaled.dtype == np.uint8 else fill
                canvas[top : top + box_h, left : left + box_w] = scaled
                scaled = canvas
            frame_rows[-1].append(len(resized))
            resized.append(scaled)
            boxes.append((top, left, box_h, box_w))
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().div_(255.0)
    shares = [input_shares(mask, box, image_size) for box in boxes]
    if intensity == "standardise":
        for rows, grey_level in zip(frame_rows, grey_levels, strict=True):
            content = torch.cat([_content(batch[row], boxes[row], shares[row]) for row in rows])
            mean, std = content.mean(), content.std().clamp_min(grey_level)
            for row in rows:
                batch[row].sub_(mean).mul_(STANDARD_STD / std).add_(STANDARD_MEAN)
    apply_to_inputs(batch, shares)
    return batch


def _content(frame: torch.Tensor, box: tuple[int, int, int, int], shares: np.ndarray | None) -> torch.Tensor:
    """The values of ``frame`` ``(3, S, S)`` inside its content ``box``, only its inspected pixels with ``shares``."""
    top, left, height, width = box
    content = frame[:, top : top + height, left : left + width]
    if shares is None:
        return content.reshape(-1)
    return content[:, torch.from_numpy(shares[top : top + height, left : left + width] > 0.5)].reshape(-1)


def crop_to_frames(maps: torch.Tensor, shapes: Sequence[tuple[int, int]], resize: Resize) -> torch.Tensor:
    """``(N, S, S)`` maps over the padded input -> ``(N, S, S)`` over each frame (its content box stretched); other
    resize modes' maps are returned as they are (tiles are stitched after position normalisation)."""
    if resize != "pad":
        return maps
    size = maps.shape[-1]
    cropped = []
    for frame_map, (height, width) in zip(maps, shapes, strict=True):
        top, left, box_h, box_w = content_box(height, width, size, resize)
        box = frame_map[None, None, top : top + box_h, left : left + box_w]
        cropped.append(F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(cropped)


def resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """``(N, s, s)`` maps -> ``(N, size, size)`` (bilinear; unchanged when ``s == size``)."""
    if maps.shape[-1] == size:
        return maps
    resized = F.interpolate(torch.from_numpy(maps)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return resized[:, 0].numpy()


def check_mask_size(mask: InspectionMask, image_size: int, resize: Resize, name: str) -> None:
    """Raise MaskError unless ``mask`` inspects a whole pixel of the ``image_size`` input (a frame of its aspect,
    placed as ``resize`` places it) and of the maps of method ``name``."""
    height, width = mask.inspected.shape
    box_h, box_w = content_box(height, width, image_size, resize)[2:]
    mask.check_size(box_h, box_w, f"{name}'s input of {image_size} px")
    mask.check_size(image_size, image_size, f"{name}'s maps of {image_size} px")


def _shared_settings(model: ModelSettings, scoring: ScoringSettings) -> tuple[object, ...]:
    """What fused Scorers must agree on: they see the frames alike (each at its own input size) and average maps
    pixel by pixel."""
    return model.resize, model.intensity, *(getattr(scoring, key) for key in SHARED_SCORING_KEYS)


class Scorer:
    """A fitted method plus everything shared around it: preprocessing, shifting, maps, image scores, threshold."""

    def __init__(
        self,
        method: AnomalyMethod,
        model_settings: ModelSettings,
        scoring: ScoringSettings,
        training: TrainingSummary,
        threshold: Threshold | None = None,
        model_id: str = "unsaved",
        position_stats: PositionStats | None = None,
        companions: Sequence[Scorer] = (),
        registration: Registration | None = None,
        inspection_mask: InspectionMask | None = None,
    ) -> None:
        if position_stats is not None and position_stats.image_size != model_settings.image_size:
            msg = f"position statistics of {position_stats.image_size} px for a {model_settings.image_size} px model"
            raise ValueError(msg)
        self.method = method
        self.position_stats = position_stats
        self.model_settings = model_settings
        self.scoring = scoring
        self.training = training
        self.threshold = threshold
        self.model_id = model_id
        self.offsets = shift_offsets(scoring.shift_pixels, scoring.shift_pattern)
        self.companions: tuple[Scorer, ...] = tuple(companions)
        self.registration = registration
        self.inspection_mask = inspection_mask
        if inspection_mask is not None and model_settings.resize == "tile":
            msg = "an inspection mask cannot be used with resize 'tile' (pieces of frames of any length)"
            raise ValueError(msg)
        if inspection_mask is not None:
            check_mask_size(inspection_mask, model_settings.image_size, model_settings.resize, method.name)
        ours = _shared_settings(model_settings, scoring)
        for companion in companions:
            theirs = _shared_settings(companion.model_settings, companion.scoring)
            if companion.inspection_mask != inspection_mask:
                msg = f"cannot fuse {companion.method.name} with {method.name}: their inspection masks differ"
                raise ValueError(msg)
            if ours != theirs or companion.companions:
                msg = (
                    f"cannot fuse {companion.method.name} with {method.name}: resize, intensity and "
                    f"{', '.join(SHARED_SCORING_KEYS)} must match ({theirs} vs {ours}), and companions have none"
                )
                raise ValueError(msg)

    @property
    def image_size(self) -> int:
        return self.model_settings.image_size

    def describe(self) -> str:
        """One line for people: the method(s), their input size where it differs, and what was fitted."""
        parts = []
        for member in (self, *self.companions):
            size = "" if member.image_size == self.image_size else f" at {member.image_size} px"
            parts.append(f"{member.method.name}{size} ({member.method.describe()})")
        registered = ", frames registered to the good frames' pose" if self.registration is not None else ""
        masked = f", {self.inspection_mask.describe()}" if self.inspection_mask is not None else ""
        return " + ".join(parts) + registered + masked

    def with_scoring(self, scoring: ScoringSettings) -> Scorer:
        """The same fitted model scored with other settings (e.g. shifting on), sharing its fitted state; companions
        take over the settings fused members share (shifting, batch size)."""
        shared = {key: getattr(scoring, key) for key in SHARED_SCORING_KEYS}
        companions = [c.with_scoring(c.scoring.model_copy(update=shared)) for c in self.companions]
        return Scorer(self.method, self.model_settings, scoring, self.training, self.threshold, self.model_id,
                      self.position_stats, companions, self.registration, self.inspection_mask)  # fmt: skip

    def aspect_mismatch(self, height: int, width: int) -> str | None:
        """Why this model cannot score a ``height x width`` frame, or None when it can: with an inspection mask, a
        frame of another aspect (``InspectionMask.aspect_mismatch``: a camera set to another region of interest)."""
        return None if self.inspection_mask is None else self.inspection_mask.aspect_mismatch(height, width)

    def _check_aspects(self, images: Sequence[np.ndarray]) -> None:
        """Raise MaskError naming the first frame the inspection mask does not fit (see ``aspect_mismatch``)."""
        if self.inspection_mask is not None:
            for position, image in enumerate(images):
                self.inspection_mask.check_frame(image.shape[0], image.shape[1], f"image {position}")

    def warm_up(self) -> None:
        """Score one grey frame of a shape the model takes (its mask's aspect, else square), so that lazy
        initialisation is done before the first real frame."""
        mask, size = self.inspection_mask, self.image_size
        shape = (size, size) if mask is None else mask.frame_shape(size)
        self.score([np.full((*shape, 3), 128, dtype=np.uint8)])

    def _views(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Preprocessed, shifted views ``(N * V, 3, S, S)`` and the frames' ``(height, width)``."""
        if len(images) == 0:
            msg = "score() needs at least one image"
            raise ValueError(msg)
        model = self.model_settings
        batch = preprocess(images, self.image_size, model.resize, model.intensity, self.inspection_mask)
        views = shifted_views(batch, self.offsets)
        return views, [(image.shape[0], image.shape[1]) for image in images]

    def _raw_maps(self, views: torch.Tensor, shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, MethodOutput, float]:
        """``(T, S, S)`` maps before normalisation and smoothing (``T = N`` frames, or their pieces when tiling), the
        method output, and when post-processing began."""
        size = self.image_size
        output = self.method.score_views(views, self.scoring)
        started_post = time.perf_counter()
        if output.patch_maps.shape[0] != views.shape[0]:
            msg = f"{self.method.name} returned {output.patch_maps.shape[0]} maps for {views.shape[0]} views"
            raise RuntimeError(msg)
        patch_maps = output.patch_maps[:, None].float()
        view_maps = F.interpolate(patch_maps, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        aggregated = align_and_aggregate(view_maps, self.offsets, self.scoring.shift_aggregate)
        return crop_to_frames(aggregated, shapes, self.model_settings.resize), output, started_post

    @torch.inference_mode()
    def unnormalised_maps(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(T, S, S)`` maps of this Scorer's own method (not its companions') before position normalisation and
        smoothing, one per frame or, when tiling, per piece: what its ``PositionStats`` are fitted on."""
        self._check_aspects(images)
        if self.registration is not None:
            images = self.registration.align(images)[0]
        return self._raw_maps(*self._views(images))[0]

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], shift_every_frame: bool = False) -> ScoreBatch:
        """Image scores ``(N,)`` and heatmaps ``(N, S, S)`` of the frames (``map_baseline``: maps less their median).

        With shifting on, a threshold and the per-pixel minimum over views, frames are scored unshifted first and
        only failing ones again with shifts (``scoring.shift_only_failing``: the same verdicts as shifting every
        frame); ``shift_every_frame`` shifts them all, as calibrating a threshold needs. A registered model
        (``models.registration``) moves the frames into the good frames' pose first and their maps back after
        (counted in post-processing time).
        """
        scoring = self.scoring
        self._check_aspects(images)
        poses, registration_s = None, 0.0
        if self.registration is not None:
            started = time.perf_counter()
            images, poses = self.registration.align(images)
            registration_s = time.perf_counter() - started
        only_failing = scoring.shift_only_failing and scoring.shift_aggregate == "min" and len(self.offsets) > 1
        if only_failing and self.threshold is not None and not shift_every_frame:
            batch = self._shifting_failing(images, self.threshold.value)
        else:
            batch = self._fused(images)
        started = time.perf_counter()
        medians = self._inspected_medians(batch.maps) if scoring.map_baseline == "median" else None
        if poses is not None:  # maps back into each frame's pose (linear, borders replicated: the medians still hold)
            maps = Registration.restore(batch.maps, poses)
            batch = batch._replace(maps=maps, unregistered=np.array([pose is None for pose in poses], dtype=bool))
        if medians is not None:
            batch = batch._replace(maps=(batch.maps - medians[:, None, None]).astype(np.float32))
        if poses is not None or medians is not None:
            postprocess_s = batch.timings.postprocess_s + registration_s + time.perf_counter() - started
            batch = batch._replace(timings=replace(batch.timings, postprocess_s=postprocess_s))
        return batch

    def _inspected_medians(self, maps: np.ndarray) -> np.ndarray:
        """``(N,)``: each of the ``(N, S, S)`` maps' median over its inspected pixels (all of them without a mask;
        ignored pixels, set to the frame's lowest inspected value, would pull it down)."""
        if self.inspection_mask is None:
            return np.median(maps.reshape(len(maps), -1), axis=1)
        return np.median(maps[:, self.inspection_mask.pixels(self.image_size).numpy()], axis=1)

    def _shifting_failing(self, images: Sequence[np.ndarray], threshold: float) -> ScoreBatch:
        """Unshifted scores and maps, those of frames scoring above ``threshold`` replaced by their shifted ones.

        Exact for verdicts: the shifted map is the per-pixel minimum over views that include the unshifted one, and
        normalisation, smoothing, image scores and fusion never decrease when a map decreases, so a shifted score
        is at most the unshifted one.
        """
        first = self.with_scoring(self.scoring.model_copy(update={"shift_pixels": 0}))._fused(images)
        failing = np.flatnonzero(first.scores > threshold)
        if failing.size == 0:
            return first
        shifted = self._fused([images[int(index)] for index in failing])
        scores, maps, flags = first.scores.copy(), first.maps.copy(), first.shifted.copy()
        scores[failing], maps[failing], flags[failing] = shifted.scores, shifted.maps, shifted.shifted
        timings = StageTimings(*(a + b for a, b in zip(astuple(first.timings), astuple(shifted.timings), strict=True)))
        return ScoreBatch(scores, maps, timings, flags)

    def _fused(self, images: Sequence[np.ndarray]) -> ScoreBatch:
        """This Scorer's and its companions' scores and maps, averaged: one shared backbone pass per input size,
        a companion's maps of another size resized to this Scorer's before the mean."""
        views, shapes = self._views(images)
        if not self.companions:
            return self._score_views(views, shapes)
        views_by_size = {self.image_size: views}
        with shared_backbone_pass():
            members = [self._score_views(views, shapes)]
            for companion in self.companions:  # same-size companions get the very same views: their pass is shared
                if companion.image_size not in views_by_size:
                    views_by_size[companion.image_size] = companion._views(images)[0]
                members.append(companion._score_views(views_by_size[companion.image_size], shapes))
        started_fusion = time.perf_counter()
        scores = np.stack([member.scores for member in members]).mean(axis=0, dtype=np.float32)
        maps = np.stack([resize_maps(m.maps, self.image_size) for m in members]).mean(axis=0, dtype=np.float32)
        fusion_s = time.perf_counter() - started_fusion
        timings = StageTimings(sum(m.timings.backbone_s for m in members), sum(m.timings.search_s for m in members),
                               sum(m.timings.postprocess_s for m in members) + fusion_s)  # fmt: skip
        return ScoreBatch(scores, maps, timings, members[0].shifted)

    def _score_views(self, views: torch.Tensor, shapes: list[tuple[int, int]]) -> ScoreBatch:
        """This Scorer's own method on prepared views: normalised, smoothed maps and image scores of the N frames."""
        aggregated, output, started_post = self._raw_maps(views, shapes)
        _, grid_h, grid_w = output.patch_maps.shape
        if self.position_stats is not None and self.scoring.normalise_positions:
            aggregated = self.position_stats.apply(aggregated)
        tiled = self.model_settings.resize == "tile"
        mask, sigma = self.inspection_mask, self.scoring.smoothing_sigma
        if mask is not None:
            maps = self._masked_smoothing(aggregated, mask)
        else:
            maps = gaussian_blur(stitch_tiles(aggregated, shapes) if tiled else aggregated, sigma)
        if output.view_scores is not None:
            scores = aggregate_view_scores(output.view_scores.float(), self.offsets, self.scoring.shift_aggregate)
            if tiled:  # a frame scores as its worst piece
                scores = torch.stack([pieces.amax() for pieces in split_by_frame(scores, shapes)])
        elif self.scoring.image_score == "max":
            scores = maps.flatten(1).amax(dim=1)
        else:  # mean of the top_k patch scores among all of the frame's patches (all its pieces' when tiling)
            if mask is None:
                grid_scores = F.adaptive_avg_pool2d(aggregated[:, None], (grid_h, grid_w)).flatten(1)
            else:  # each cell's mean over its inspected pixels, cells mostly ignored left out
                inspected = mask.pixels(self.image_size).float()[None, None]
                sums = F.adaptive_avg_pool2d(aggregated[:, None] * inspected, (grid_h, grid_w)).flatten(1)
                shares = mask.cell_shares(self.image_size, grid_h, grid_w)
                counted = mask.cells(self.image_size, grid_h, grid_w)
                grid_scores = (sums / shares.clamp_min(1e-6))[:, counted]
            frames = split_by_frame(grid_scores, shapes) if tiled else grid_scores[:, None]
            scores = torch.stack([cells.flatten().topk(min(self.scoring.top_k, cells.numel())).values.mean()
                                  for cells in frames])  # fmt: skip
        finished = time.perf_counter()
        if scores.shape[0] != len(shapes) or maps.shape[0] != len(shapes):
            msg = f"scorer produced {scores.shape[0]} scores for {len(shapes)} images"
            raise RuntimeError(msg)
        timings = StageTimings(output.embed_s, output.search_s, finished - started_post)
        shifted = np.full(len(shapes), len(self.offsets) > 1)
        return ScoreBatch(scores.numpy().astype(np.float32), maps.numpy().astype(np.float32), timings, shifted)

    def _masked_smoothing(self, maps: torch.Tensor, mask: InspectionMask) -> torch.Tensor:
        """``(N, S, S)`` maps smoothed over inspected pixels only (each pixel's Gaussian average of its inspected
        neighbours), ignored pixels set to their frame's lowest inspected value."""
        inspected = mask.pixels(self.image_size)
        weights = inspected.float()
        sigma = self.scoring.smoothing_sigma
        reach = mask.derived(("smoothed weights", self.image_size, sigma),
                             lambda: gaussian_blur(weights[None], sigma).clamp_min(1e-6))  # fmt: skip
        smoothed = gaussian_blur(maps * weights, sigma) / reach
        lowest = smoothed[:, inspected].amin(dim=1)
        return torch.where(inspected, smoothed, lowest[:, None, None])

    def verdicts(self, scores: np.ndarray) -> list[bool]:
        """True = fail (anomalous). Raises when the model has no threshold yet."""
        if self.threshold is None:
            msg = "this model has no threshold: run `lineinspect calibrate --model DIR --good DIR` first"
            raise RuntimeError(msg)
        return [bool(score > self.threshold.value) for score in scores]

    def save(self, model_dir: Path) -> str:
        """Write the artifact directory; returns the new model id. See ``models.artifact``."""
        from models.artifact import save_scorer

        self.model_id = save_scorer(self, model_dir)
        return self.model_id
