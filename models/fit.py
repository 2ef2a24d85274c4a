"""Fitting a Scorer on good images: embed in batches, build the bank, index it, calibrate a first threshold.

Two deterministic slices of the good images (chosen by hashes of the file name) are kept out of the method's
training: with ``scoring.normalise_positions``, ``scoring.normalisation_fraction`` of them give the per-pixel
statistics of good maps (``models.normalisation``); then ``holdout_fraction`` of them, scored with those
statistics, set the initial pass/fail threshold at the configured false-reject rate, so a freshly fitted model can
make verdicts at once; ``lineinspect calibrate`` refines it on more good images. Few images: a threshold slice of
fewer than 2 (its threshold would fail about half of all good parts) is fitted on instead and the model has no
threshold, and no slice is kept out that would leave fewer than 2 images to fit (``MIN_FIT_IMAGES``); thresholds
from fewer than 20 images are unreliable and say so (``models.threshold``, benchmarks/RESULTS.md section 7). Each
``[fusion]`` member is fitted the same way on the same slices, with its own position statistics; the threshold is
set on the fused scores. Unreadable images are skipped with a warning, those whose header cannot be read before
the slices are cut (so every count above is of readable images); fitting fails only when no valid image is left.
With ``[model] intensity = "auto"`` the good images outside the threshold slice first choose standardised or raw
frames (``models.intensity``) and, with ``registration`` on or "auto", a reference pose that every frame is
moved into (``models.registration``); the model stores both choices and how they were made. An inspection mask
(``[model] inspection_mask``) is read first and checked against every good image's aspect; the intensity choice,
the registration and every member look at its inspected pixels only, and the model stores it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.datasets import image_shape
from models.images import ImageError, read_image
from models.inspection_mask import InspectionMask
from models.intensity import choose_intensity
from models.methods import method_class
from models.normalisation import PositionStatsBuilder
from models.registration import Registration, choose_registration, ignored_grid
from models.scorer import Scorer, TrainingSummary, check_mask_size, preprocess, resolve_device
from models.threshold import MIN_GOOD_IMAGES, RELIABLE_GOOD_IMAGES, false_reject_threshold
from models.tiling import tile_count
from pipeline.config import Config, IntensitySetting, Resize

log = logging.getLogger(__name__)
MIN_FIT_IMAGES = 2  # PaDiM, N-pad and the Gaussian method estimate covariances: no slice is kept out below this
FEW_GOOD_IMAGES = 100  # fewer: the model is much weaker, and says so (benchmarks/RESULTS.md section 7)
NAMED_UNREADABLE = 20  # unreadable files an error names one by one


def holdout_split(paths: Sequence[Path], fraction: float, salt: str = "") -> tuple[list[Path], list[Path]]:
    """``(fit, holdout)``: a file goes to holdout when the sha1 of ``salt`` + its name falls in the first
    ``fraction`` (different salts give independent slices), so its slice does not depend on the other files.
    Small sets can be unlucky (64 files, 10%: none; f00.tif to f19.tif, 10%: 7): when the slice holds under half or
    over twice the expected ``fraction * n`` and that is at least 2 files, it takes the ``round(fraction * n)`` files
    with the lowest hashes instead."""
    buckets = [int(hashlib.sha1((salt + path.name).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for path in paths]
    expected = fraction * len(paths)
    cut = fraction
    held_out = sum(bucket < fraction for bucket in buckets)
    if round(expected) >= 2 and not expected / 2 <= held_out <= 2 * expected:
        cut = sorted(buckets)[round(expected) - 1] + 1e-12
    fit = [path for path, bucket in zip(paths, buckets, strict=True) if bucket >= cut]
    holdout = [path for path, bucket in zip(paths, buckets, strict=True) if bucket < cut]
    if not fit:
        fit, holdout = list(holdout), []
    return fit, holdout


def _readable_batches(
    paths: Sequence[Path], batch_size: int, skipped: list[str], kept: list[Path] | None = None
) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for path in paths:
        try:
            batch.append(read_image(path, keep_depth=True))
        except ImageError as error:
            log.warning("skipping unreadable image: %s", error)
            skipped.append(str(error))
            continue
        if kept is not None:
            kept.append(path)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class TrainingImages:
    """Good image files as re-iterable batches ``(B, 3, S, S)``; unreadable files are skipped (once) with a warning.
    With ``resize = "tile"`` a batch holds its frames' pieces (``models.tiling``), so B varies. With a
    ``registration`` the frames are moved into its pose first."""

    paths: Sequence[Path]
    image_size: int
    batch_size: int
    resize: Resize = "stretch"
    intensity: IntensitySetting = "raw"
    skipped: list[str] = field(default_factory=list)
    registration: Registration | None = None  # frames moved into the good frames' pose first
    inspection_mask: InspectionMask | None = None  # ignored pixels flat grey (models.inspection_mask)
    _unreadable: set[Path] = field(default_factory=set)
    _pieces: dict[Path, int] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        """Readable image files (as far as known: unreadable ones are found when read)."""
        return len(self.paths) - len(self._unreadable)

    @property
    def images(self) -> int:
        """Rows one pass yields (progress bars): the frames, or when tiling their pieces (reads each file once)."""
        if self.resize != "tile":
            return self.frames
        for path in self.paths:
            if path not in self._pieces and (image := self._read(path)) is not None:
                self._pieces[path] = tile_count(image.shape[0], image.shape[1])
        return sum(self._pieces.values())

    def _read(self, path: Path) -> np.ndarray | None:
        if path in self._unreadable:
            return None
        try:
            return read_image(path, keep_depth=True)
        except ImageError as error:
            log.warning("skipping unreadable training image: %s", error)
            self.skipped.append(str(error))
            self._unreadable.add(path)
            return None

    def require_one(self) -> None:
        """Raise ValueError when no file is readable (reads files only until the first readable one)."""
        if not any(self._read(path) is not None for path in self.paths):
            msg = f"no readable training image among {len(self.paths)} files ({len(self.skipped)} skipped)"
            raise ValueError(msg)

    def __iter__(self) -> Iterator[torch.Tensor]:
        batch: list[np.ndarray] = []
        for path in self.paths:
            image = self._read(path)
            if image is None:
                continue
            batch.append(image)
            self._pieces[path] = tile_count(image.shape[0], image.shape[1])
            if len(batch) == self.batch_size:
                yield self._prepared(batch)
                batch = []
        if batch:
            yield self._prepared(batch)

    def _prepared(self, batch: list[np.ndarray]) -> torch.Tensor:
        if self.registration is not None:
            batch = self.registration.align(batch)[0]
        return preprocess(batch, self.image_size, self.resize, self.intensity, self.inspection_mask)


def fit_scorer(
    image_paths: Sequence[Path],
    config: Config,
    progress: bool = True,
    holdout_fraction: float = 0.1,
    source: str = "",
) -> Scorer:
    """Fit ``config.model.method`` (and its ``[fusion]`` members) on good images; returns a Scorer with a threshold
    from the held-out slice."""
    started = time.perf_counter()
    if not image_paths:
        msg = "no training images given"
        raise ValueError(msg)
    # unreadable files are dropped before the slices are cut: counted as images, they could leave a slice or the
    # fit with too few readable ones (3 good images and 3 empty files failed in PaDiM's covariances) and made every
    # count told to the user wrong
    image_paths, skipped = _drop_unreadable(image_paths)
    if len(image_paths) < FEW_GOOD_IMAGES:
        log.warning("%d good image%s few: on MTD's validation split the default model's image AUROC on subtle "
                    "synthetic defects rose from 54 with 10 good images to 73 with 50, 85 with 200 and 92 with 591 "
                    "(benchmarks/RESULTS.md section 7); fit again as more good images come",
                    len(image_paths), " is" if len(image_paths) == 1 else "s are")  # fmt: skip
    mask = _inspection_mask(config, image_paths)
    fit_paths, holdout_paths = holdout_split(image_paths, holdout_fraction)
    if len(holdout_paths) < MIN_GOOD_IMAGES or len(fit_paths) < MIN_FIT_IMAGES:
        if holdout_fraction > 0:
            rate = config.threshold.false_reject_rate
            log.warning("%d good images: %d would be kept out for a first threshold, which needs %d or more and %d "
                        "left to fit; all %d are fitted and the model has no threshold: run `lineinspect calibrate` "
                        "on at least %d good images it has not seen (%d measure a %.1f%% false-reject rate)",
                        len(image_paths), len(holdout_paths), MIN_GOOD_IMAGES, MIN_FIT_IMAGES, len(image_paths),
                        RELIABLE_GOOD_IMAGES, math.ceil(1 / rate), 100 * rate)  # fmt: skip
        fit_paths, holdout_paths = list(image_paths), []
    intensity_choice = ""
    if config.model.intensity == "auto":
        choice = choose_intensity(fit_paths, mask)
        intensity_choice = choice.describe()
        log.info("intensity %s", intensity_choice)
        config = config.model_copy(update={"model": config.model.model_copy(update={"intensity": choice.intensity})})
    # frames are registered at twice the largest input size at most (every member resizes them further), at full
    # resolution when tiling (pieces are scored at the frame's resolution)
    sizes = [config.model.image_size] + [config.member_config(m).model.image_size for m in config.fusion_members]
    max_side = None if config.model.resize == "tile" else 2 * max(sizes)
    ignored = ignored_grid(mask) if config.model.registration != "off" else None
    registration = choose_registration(fit_paths, config.model.registration, max_side, ignored)
    if registration.description:
        log.info("registration %s", registration.description)
    resolved = "on" if registration.registration is not None else "off"  # the model states what it does, as intensity
    config = config.model_copy(update={"model": config.model.model_copy(update={"registration": resolved})})
    scoring = config.scoring
    normalisation_fraction = scoring.normalisation_fraction if scoring.normalise_positions else 0.0
    remaining, normalisation_paths = holdout_split(fit_paths, normalisation_fraction, salt="position-stats:")
    if len(remaining) >= MIN_FIT_IMAGES:  # else none are kept out, and _fit_one warns that maps stay unnormalised
        fit_paths = remaining
    else:
        normalisation_paths = []
    registered = registration.registration
    scorer = _fit_one(config, fit_paths, normalisation_paths, progress, skipped, source, registered, mask)
    if config.fusion_members and scorer.position_stats is None:
        log.warning("fusion averages per-pixel z-scores and these good images are too few for position statistics: "
                    "fitted %s alone", config.model.method)  # fmt: skip
    elif config.fusion_members:
        companions = [_fit_one(config.member_config(member), fit_paths, normalisation_paths, progress, [], source,
                               registered, mask) for member in config.fusion_members]  # fmt: skip
        scorer = Scorer(scorer.method, scorer.model_settings, scoring, scorer.training,
                        position_stats=scorer.position_stats, companions=companions,
                        registration=registered, inspection_mask=mask)  # fmt: skip
    if holdout_paths:
        good_scores = score_paths(scorer, holdout_paths, config.scoring.batch_size, progress,
                                  "fit: calibrating on held-out good", skipped)  # fmt: skip
        if good_scores.size >= MIN_GOOD_IMAGES:
            scorer.threshold = false_reject_threshold(good_scores, config.threshold.false_reject_rate)
        else:
            log.warning("only %d of the %d good images kept out for the threshold could be read: the model has no "
                        "threshold; run `lineinspect calibrate`", good_scores.size, len(holdout_paths))  # fmt: skip
    fit_seconds = round(time.perf_counter() - started, 3)
    scorer.training = dataclasses.replace(scorer.training, skipped=skipped, fit_seconds=fit_seconds,
                                          intensity_choice=intensity_choice,
                                          registration_choice=registration.description)  # fmt: skip
    log.info("fitted %s from %d images in %.1f s", scorer.describe(), scorer.training.images, fit_seconds)
    return scorer


def _drop_unreadable(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """``(readable, reasons)``: the files whose header can be read (``models.datasets.image_shape``: nothing is
    decoded), and why each other one cannot, warned about once here. A file whose header reads but whose pixels do
    not (cut short, damaged) is still skipped where it is read. Raises ValueError when none is readable."""
    readable: list[Path] = []
    reasons: list[str] = []
    for path in paths:
        if image_shape(path) is not None:
            readable.append(path)
            continue
        try:
            read_image(path, keep_depth=True)
        except ImageError as error:
            log.warning("skipping unreadable training image: %s", error)
            reasons.append(str(error))
        else:
            readable.append(path)
    if not readable:
        named = "\n  ".join(reasons[:NAMED_UNREADABLE])
        more = f"\n  and {len(reasons) - NAMED_UNREADABLE} more" if len(reasons) > NAMED_UNREADABLE else ""
        msg = f"no readable training image among {len(paths)} files:\n  {named}{more}"
        raise ValueError(msg)
    return readable, reasons


def _fit_one(
    config: Config,
    fit_paths: Sequence[Path],
    normalisation_paths: Sequence[Path],
    progress: bool,
    skipped: list[str],
    source: str,
    registration: Registration | None,
    inspection_mask: InspectionMask | None,
) -> Scorer:
    """``config.model.method`` fitted on ``fit_paths``, position statistics from ``normalisation_paths``; files that
    cannot be read are added to ``skipped``."""
    scoring = config.scoring
    model = config.model
    images = TrainingImages(fit_paths, model.image_size, scoring.batch_size, model.resize, model.intensity, skipped,
                            registration, inspection_mask)  # fmt: skip
    images.require_one()
    method = method_class(config.model.method).fit(images, config, resolve_device(config.model.device), progress)
    scorer = Scorer(method, config.model, scoring, TrainingSummary(images=images.frames, source=source),
                    registration=registration, inspection_mask=inspection_mask)  # fmt: skip
    if normalisation_paths:
        builder = PositionStatsBuilder()
        desc = f"fit: position statistics ({method.name})"
        for batch in _progress_batches(normalisation_paths, scoring.batch_size, progress, desc, skipped):
            builder.add(scorer.unnormalised_maps(batch))
        if builder.count:
            scorer.position_stats = builder.finish(scoring.normalisation_prior_images)
    elif scoring.normalise_positions:
        log.warning("too few good images to keep some out for position statistics: maps stay unnormalised")
    return scorer


def _inspection_mask(config: Config, image_paths: Sequence[Path]) -> InspectionMask | None:
    """The mask ``[model] inspection_mask`` names, checked against each member's input size and every training
    image's aspect (from headers; unreadable images are left to the warnings that skip them). Raises MaskError naming
    the problem."""
    path = config.model.inspection_mask
    if path is None:
        return None
    mask = InspectionMask.from_image(path)
    for model in [config.model] + [config.member_config(member).model for member in config.fusion_members]:
        check_mask_size(mask, model.image_size, model.resize, model.method)
    mask.check_files(image_paths, "good images", f"the inspection mask {path}",
                     "leave them out, or draw the mask over a frame as this camera delivers it")  # fmt: skip
    log.info("inspection mask %s: %s", path, mask.describe())
    return mask


def score_paths(
    scorer: Scorer,
    paths: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "scoring",
    skipped: list[str] | None = None,
    kept: list[Path] | None = None,
) -> np.ndarray:
    """Image scores ``(readable images,)`` of image files, every frame shifted when shifting is on (thresholds are
    chosen from these); unreadable ones are warned about and added to ``skipped``, the scored ones to ``kept`` (in
    the order of the scores). With an inspection mask, ``InspectionMask.check_files`` first: a file of another
    aspect than the mask's stops scoring where it is met (``Scorer.score``)."""
    skipped = [] if skipped is None else skipped
    batches = _progress_batches(paths, batch_size, progress, desc, skipped, kept)
    scores = [scorer.score(batch, shift_every_frame=True).scores for batch in batches]
    return np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)


def _progress_batches(
    paths: Sequence[Path], batch_size: int, progress: bool, desc: str, skipped: list[str],
    kept: list[Path] | None = None,
) -> Iterator[list[np.ndarray]]:  # fmt: skip
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for batch in _readable_batches(paths, batch_size, skipped, kept):
            yield batch
            bar.update(len(batch))
