"""The model artifact: one directory, no pickle.

::

    MODEL_DIR/
      manifest.json   format version, model id, settings (backbone, layers, image size, bank, index, scoring),
                      threshold, training summary, feature shape, library versions, sha256 of every file,
                      and a content hash over all of that
      bank.npy        memory bank (rows, channels) float32, numpy format with allow_pickle=False
      index.faiss     faiss index written from the CPU (faiss's own binary format)

``load_scorer`` checks the format version, every file's sha256, the content hash, and that the backbone
really produces features of the recorded shape; anything wrong raises ``ArtifactError`` naming the problem.
The model id is the first 12 hex digits of the content hash, so a recalibrated model is a new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from models.backbones import load_backbone
from models.errors import ArtifactError, BackboneError
from models.features import PatchFeatureExtractor
from models.index import IndexError_, NearestNeighbourIndex
from models.memory_bank import MemoryBank, MemoryBankError
from models.scorer import Scorer, Threshold, TrainingSummary, resolve_device
from pipeline.config import BankSettings, IndexSettings, ModelSettings, ScoringSettings

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BANK_FILE = "bank.npy"
INDEX_FILE = "index.faiss"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_hash(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key not in ("content_hash", "model_id")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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
    manifest["content_hash"] = _content_hash(manifest)
    manifest["model_id"] = manifest["content_hash"][:12]
    handle, temporary = tempfile.mkstemp(dir=model_dir, prefix=".manifest-", suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(manifest, stream, indent=2, sort_keys=True)
    os.replace(temporary, model_dir / MANIFEST)
    return str(manifest["model_id"])


def save_scorer(scorer: Scorer, model_dir: Path) -> str:
    """Write ``scorer`` to ``model_dir`` (created if needed); returns the model id."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    scorer.bank.save(model_dir / BANK_FILE)
    scorer.index.save(model_dir / INDEX_FILE)
    channels, grid_h, grid_w = scorer.extractor.output_shape(scorer.image_size)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": scorer.model_settings.model_dump(mode="json"),
        "bank": scorer.bank_settings.model_dump(mode="json") | {"rows": scorer.bank.rows, "kind": scorer.bank.kind},
        "index": scorer.index_settings.model_dump(mode="json"),
        "scoring": scorer.scoring.model_dump(mode="json"),
        "threshold": asdict(scorer.threshold) if scorer.threshold else None,
        "training": asdict(scorer.training),
        "features": {"channels": channels, "grid": [grid_h, grid_w]},
        "layers": list(scorer.extractor.backbone.layers),
        "libraries": library_versions(),
        "files": {name: _sha256(model_dir / name) for name in (BANK_FILE, INDEX_FILE)},
    }
    return _write_manifest(model_dir, manifest)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The verified manifest of ``model_dir``: files and content hash checked."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        msg = f"{model_dir} is not a lineinspect model: {MANIFEST} is missing (create one with `lineinspect fit`)"
        raise ArtifactError(msg)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{path} is corrupt: not valid JSON ({error})"
        raise ArtifactError(msg) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        msg = f"{path}: format version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        raise ArtifactError(msg)
    for name, expected in manifest.get("files", {}).items():
        file = model_dir / name
        if not file.is_file():
            msg = f"{model_dir}: {name} is missing"
            raise ArtifactError(msg)
        if _sha256(file) != expected:
            msg = f"{model_dir}: {name} does not match its sha256 in the manifest (corrupt or replaced file)"
            raise ArtifactError(msg)
    if manifest.get("content_hash") != _content_hash(manifest):
        msg = f"{path}: content hash does not match (the manifest was edited by hand or is corrupt)"
        raise ArtifactError(msg)
    return dict(manifest)


def load_scorer(model_dir: Path, device: str = "auto") -> Scorer:
    """Load and verify a model directory into a new ``Scorer``."""
    manifest = read_manifest(model_dir)
    model_dir = Path(model_dir)
    try:
        model_settings = ModelSettings.model_validate(manifest["model"] | {"device": device})
        bank_fields = {k: v for k, v in manifest["bank"].items() if k not in ("rows",)}
        bank_settings = BankSettings.model_validate(bank_fields)
        index_settings = IndexSettings.model_validate(manifest["index"])
        scoring = ScoringSettings.model_validate(manifest["scoring"])
        threshold = Threshold(**manifest["threshold"]) if manifest.get("threshold") else None
        training = TrainingSummary(**manifest["training"])
    except (KeyError, TypeError, ValueError) as error:
        msg = f"{model_dir}/{MANIFEST} has invalid or missing settings: {error}"
        raise ArtifactError(msg) from None
    try:
        bank = MemoryBank.load(model_dir / BANK_FILE, manifest["bank"]["kind"])
        use_gpu = index_settings.use_gpu == "auto" and resolve_device(device).type == "cuda"
        index = NearestNeighbourIndex.load(
            model_dir / INDEX_FILE, index_settings.kind, use_gpu, index_settings.ivf_probe
        )
        backbone = load_backbone(model_settings.backbone, tuple(manifest["layers"]), model_settings.weights_path)
    except (MemoryBankError, IndexError_, BackboneError, ValueError) as error:
        msg = f"{model_dir}: {error}"
        raise ArtifactError(msg) from None
    extractor = PatchFeatureExtractor(backbone, model_settings.aggregation_kernel, model_settings.feature_dim)
    extractor = extractor.to(resolve_device(device))
    channels, grid_h, grid_w = extractor.output_shape(model_settings.image_size)
    recorded = manifest["features"]
    if channels != recorded["channels"] or [grid_h, grid_w] != recorded["grid"] or channels != bank.channels:
        msg = (
            f"{model_dir}: backbone {model_settings.backbone} {manifest['layers']} gives features "
            f"{channels}x{grid_h}x{grid_w}, the model was fitted on {recorded['channels']}x{recorded['grid']} "
            f"(bank has {bank.channels} channels): backbone or weights mismatch"
        )
        raise ArtifactError(msg)
    return Scorer(
        extractor, bank, index, model_settings, bank_settings, index_settings, scoring, training, threshold,
        model_id=str(manifest["model_id"]),
    )  # fmt: skip


def update_threshold(model_dir: Path, threshold: Threshold) -> str:
    """Write a new threshold into a verified model directory; returns the new model id."""
    manifest = read_manifest(model_dir)
    manifest["threshold"] = asdict(threshold)
    return _write_manifest(Path(model_dir), manifest)
