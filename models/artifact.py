"""The model artifact: one directory, no pickle.

::

    MODEL_DIR/
      manifest.json   format version, model id, model settings (backbone, image size), the method's section (its
                      name, settings, fitted sizes, layers, feature shape), scoring settings, threshold, training
                      summary, library versions, sha256 of every file, and a content hash over all of that
      ...             the method's own files (``models.methods``), e.g. PatchCore's ``bank.npy`` (numpy format,
                      loaded with allow_pickle=False) and ``index.faiss`` (written from the CPU); torch weights are
                      state dicts read back with ``weights_only=True``
      position_stats.npz  per-pixel mean and std of held-out good maps (``models.normalisation``), when fitted
      registration.npz    the good frames' reference pose (``models.registration``), when frames are registered
      inspection_mask.png the pixels inspected, 0/255 (``models.inspection_mask``), when the model has a mask (also in
                      each fusion member)
      fusion-1-padim/ ... one complete artifact per ``[fusion]`` member (no threshold of its own), recorded in the
                      manifest by directory and content hash

``save_scorer`` writes a complete new directory beside ``MODEL_DIR`` and only then puts it in place (the old
model, if any, is removed after), so a fit that fails half-way leaves the old model intact, no file of an older
model survives into the new one, and a worker that (re)loads ``MODEL_DIR`` meanwhile reads one whole model or the
other. What the old directory held besides its model (notes, a report) moves into the new one. A directory that
exists, is not empty and holds no ``manifest.json`` is never replaced.

``load_scorer`` checks the format version, every file's sha256 and the content hash, then lets the method check
its own files against the manifest (PatchCore: the backbone really produces features of the recorded shape);
anything wrong raises ``ArtifactError`` naming the problem. Reading and verifying the manifest alone needs no torch
(``models.manifest``).
The model id is the first 12 hex digits of the content hash, so a recalibrated model is a new version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from models.errors import ArtifactError
from models.inspection_mask import FILE as MASK_FILE
from models.inspection_mask import InspectionMask, MaskError
from models.manifest import FORMAT_VERSION, MANIFEST, check_member, file_sha256, manifest_content_hash, read_manifest
from models.manifest import verify_model as verify_model  # re-exported: its callers import it from here
from models.methods import method_class
from models.normalisation import STATS_FILE, PositionStats
from models.registration import FILE as REGISTRATION_FILE
from models.registration import Registration, ignored_grid
from models.scorer import Scorer, Threshold, TrainingSummary, resolve_device
from pipeline.config import ModelSettings, ScoringSettings

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def _write_manifest(model_dir: Path, manifest: dict[str, Any]) -> str:
    manifest["content_hash"] = manifest_content_hash(manifest)
    manifest["model_id"] = manifest["content_hash"][:12]
    temporary = model_dir / f".manifest-{uuid.uuid4().hex[:8]}.json"
    with temporary.open("x") as stream:  # the umask's permissions, so workers running as another user can read it
        json.dump(manifest, stream, indent=2, sort_keys=True)
    os.replace(temporary, model_dir / MANIFEST)
    return str(manifest["model_id"])


def _model_entries(model_dir: Path) -> set[str] | None:
    """The names of a lineinspect model's own entries in ``model_dir`` (manifest, listed files, fusion member
    directories), from its manifest; None when ``model_dir`` holds no lineinspect manifest (a JSON object with a
    ``format_version`` and a ``files`` object): a ``manifest.json`` of anything else does not make a model."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        return None
    if not isinstance(manifest.get("files"), dict):
        return None
    fusion = manifest.get("fusion")
    members = [entry for entry in fusion if isinstance(entry, dict)] if isinstance(fusion, list) else []
    return {MANIFEST, *manifest["files"], *(str(entry.get("dir")) for entry in members)}


def check_model_destination(model_dir: Path) -> Path:
    """The directory ``save_scorer`` would write, resolved (a symlink's target is replaced, the link kept).
    Raises ``ArtifactError`` for what saving cannot or must not replace: a file, a directory with content that is
    not a lineinspect model, the current directory or one holding it, a mount point (a new directory is written
    beside it and renamed into place), a location whose parent is not writable. Call it before fitting."""
    target = Path(model_dir).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        msg = f"{model_dir} is the current directory or holds it: write the model to a directory of its own"
        raise ArtifactError(msg)
    if os.path.ismount(target):
        msg = (f"{model_dir} is a mount point: a model is written beside its directory and renamed into place, "
               f"so write it to a directory inside the mount (e.g. {Path(model_dir) / 'model'})")  # fmt: skip
        raise ArtifactError(msg)
    parent = next(path for path in target.parents if path.exists())  # where the new directory is written
    if not os.access(parent, os.W_OK):
        msg = f"{model_dir} cannot be written ({parent} is not writable): choose another output for the model"
        raise ArtifactError(msg)
    if target.exists():
        if not target.is_dir():
            msg = f"{model_dir} exists and is not a directory: choose another output for the model"
            raise ArtifactError(msg)
        if any(target.iterdir()) and _model_entries(target) is None:
            msg = (f"{model_dir} exists, is not empty and is not a lineinspect model (no lineinspect {MANIFEST}): "
                   "refusing to replace it; choose a new or empty directory")  # fmt: skip
            raise ArtifactError(msg)
    return target


def save_scorer(scorer: Scorer, model_dir: Path) -> str:
    """Write ``scorer`` as the model directory ``model_dir``, replacing a model already there; returns the model
    id. The new directory is written complete beside the old one (same parent, so on the same file system), then
    renamed into place, the old one renamed aside just before (between the two renames ``model_dir`` does not
    exist: a loader then reports the manifest missing and tries again later; a failure rolls the old one back).
    Only then does what the old directory held besides its model move into the new one, and the old is deleted."""
    target = check_model_destination(model_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_saves(target)
    staging = _sibling(target, "writing")
    try:
        staging.mkdir()  # with the umask's permissions, like any directory the user makes
        model_id = _write_scorer(scorer, staging, member=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = None
    try:
        if target.exists():
            retired = _sibling(target, "replaced")
            os.replace(target, retired)
        os.replace(staging, target)
    except BaseException:
        if retired is not None and not target.exists():
            os.replace(retired, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if retired is not None:
        _retire(retired, target)
    return model_id


def _sibling(target: Path, purpose: str) -> Path:
    """A hidden, unused name beside ``target`` for a directory being written or retired."""
    return target.parent / f".{target.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _retire(retired: Path, target: Path) -> None:
    """Move what the replaced model directory ``retired`` held besides its model (notes, a report written into it)
    into ``target``, then delete it; keep it (and say so) when something of the user's could not be moved."""
    own = _model_entries(retired) or {MANIFEST}
    kept = []
    for entry in retired.iterdir():
        if entry.name in own or entry.name.startswith(".manifest-"):
            continue
        try:
            if (target / entry.name).exists():
                raise FileExistsError(entry.name)
            shutil.move(str(entry), str(target / entry.name))
        except OSError:
            kept.append(entry.name)
    if kept:
        log.warning("kept the replaced model directory %s: %s could not be moved into %s (name taken or error)",
                    retired, ", ".join(sorted(kept)), target)  # fmt: skip
    else:
        shutil.rmtree(retired, ignore_errors=True)


def _recover_interrupted_saves(target: Path) -> None:
    """Finish what a save stopped outright (SIGKILL, power loss) left beside ``target``, judged by whether its
    process still runs on this host: an old model renamed aside while ``target`` is missing is put back; one
    renamed aside after ``target`` was replaced is retired (the user's files moved in); a directory being written
    is deleted (it never holds the user's files)."""
    siblings = sorted(target.parent.glob(f".{target.name}.*-*-*"))
    for sibling in siblings:
        purpose, _, rest = sibling.name[len(target.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if purpose not in ("writing", "replaced") or not pid.isdigit() or _process_runs(int(pid)):
            continue
        if purpose == "writing":
            shutil.rmtree(sibling, ignore_errors=True)
        elif not target.exists():
            os.replace(sibling, target)
        else:
            _retire(sibling, target)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _write_scorer(scorer: Scorer, model_dir: Path, member: bool) -> str:
    """Write ``scorer`` into the new, empty directory ``model_dir``. A fusion ``member`` is written without the
    registration, which only the fused model uses (it registers frames before its members see them)."""
    model_dir.mkdir(exist_ok=True)
    section = scorer.method.save(model_dir)
    files = list(section.pop("files"))
    stats = scorer.position_stats
    if stats is not None:
        files.append(stats.save(model_dir))
    registration = None if member else scorer.registration
    if registration is not None:
        files.append(registration.save(model_dir))
    model = scorer.model_settings.model_dump(mode="json")
    del model["inspection_mask"]  # recorded only with a mask: lineinspect before masks loads the other models
    if scorer.inspection_mask is not None:  # the name of the stored copy, not the path it was read from
        model["inspection_mask"] = scorer.inspection_mask.save(model_dir)
        files.append(model["inspection_mask"])
    fusion = []
    for position, companion in enumerate(scorer.companions, start=1):
        name = f"fusion-{position}-{companion.method.name}"
        _write_scorer(companion, model_dir / name, member=True)
        fusion.append({"dir": name, "content_hash": read_manifest(model_dir / name)["content_hash"]})
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "method": {"name": scorer.method.name} | section,
        "scoring": scorer.scoring.model_dump(mode="json"),
        "threshold": asdict(scorer.threshold) if scorer.threshold else None,
        "position_stats": {"images": stats.images} if stats is not None else None,
        "registration": {"fit_response": registration.fit_response} if registration else None,
        "fusion": fusion,
        "training": asdict(scorer.training),
        "libraries": library_versions(),
        "files": {name: file_sha256(model_dir / name) for name in files},
    }
    return _write_manifest(model_dir, manifest)


# Settings added after models were first written, with the value that reproduces a model written before them
OLDER_MODEL_SETTINGS = {"intensity": "raw", "registration": "off"}
OLDER_SCORING_SETTINGS = {"map_baseline": "none"}


def load_scorer(model_dir: Path, device: str = "auto") -> Scorer:
    """Load and verify a model directory into a new ``Scorer``."""
    manifest = read_manifest(model_dir)
    model_dir = Path(model_dir)
    try:
        model_settings = ModelSettings.model_validate(OLDER_MODEL_SETTINGS | manifest["model"] | {"device": device})
        section = dict(manifest["method"])
        cls = method_class(section.pop("name"))
        scoring = ScoringSettings.model_validate(OLDER_SCORING_SETTINGS | manifest["scoring"])
        threshold = Threshold(**manifest["threshold"]) if manifest.get("threshold") else None
        training = TrainingSummary(**manifest["training"])
        stats_entry = manifest.get("position_stats")
        stats_images = int(stats_entry["images"]) if stats_entry is not None else 0
        fusion = [(str(entry["dir"]), str(entry["content_hash"])) for entry in manifest.get("fusion", [])]
    except (KeyError, TypeError, ValueError) as error:
        msg = f"{model_dir}/{MANIFEST} has invalid or missing settings: {error}"
        raise ArtifactError(msg) from None
    if stats_entry is not None and STATS_FILE not in manifest.get("files", {}):
        msg = f"{model_dir}/{MANIFEST} records position statistics but does not list {STATS_FILE}"
        raise ArtifactError(msg)
    stats = PositionStats.load(model_dir, stats_images, model_settings.image_size) if stats_entry else None
    registered = manifest.get("registration") is not None
    if registered and REGISTRATION_FILE not in manifest.get("files", {}):
        msg = f"{model_dir}/{MANIFEST} records a registration but does not list {REGISTRATION_FILE}"
        raise ArtifactError(msg)
    mask = _inspection_mask(model_dir, model_settings, manifest)
    registration = Registration.load(model_dir, ignored_grid(mask)) if registered else None
    method = cls.load(model_dir, section, model_settings, resolve_device(device))
    companions = []
    for name, content_hash in fusion:
        check_member(model_dir, name, content_hash, read_manifest)
        companions.append(load_scorer(model_dir / name, device))
    try:
        return Scorer(method, model_settings, scoring, training, threshold, str(manifest["model_id"]), stats,
                      companions, registration, mask)  # fmt: skip
    except ValueError as error:
        msg = f"{model_dir}: {error}"
        raise ArtifactError(msg) from None


def _inspection_mask(model_dir: Path, model_settings: ModelSettings, manifest: dict[str, Any]) -> InspectionMask | None:
    """The model's stored inspection mask, or None; raises ArtifactError when the manifest and files disagree."""
    name = model_settings.inspection_mask
    if name is None:
        return None
    if str(name) != MASK_FILE or MASK_FILE not in manifest.get("files", {}):
        msg = f"{model_dir}/{MANIFEST} records an inspection mask ({name}) but does not list {MASK_FILE}"
        raise ArtifactError(msg)
    try:
        return InspectionMask.load(model_dir)
    except MaskError as error:
        raise ArtifactError(str(error)) from None


def update_threshold(model_dir: Path, threshold: Threshold) -> str:
    """Write a new threshold into a verified model directory; returns the new model id."""
    manifest = read_manifest(model_dir)
    manifest["threshold"] = asdict(threshold)
    return _write_manifest(Path(model_dir), manifest)
