"""A model directory's manifest (``manifest.json``, ``models.artifact``) read and verified without torch.

Commands that only ask how a model was set (``lineinspect replay``'s threshold basis, ``promote``'s check) need its
manifest, not the model: importing ``models.artifact`` (torch, faiss, the methods) cost them seconds. Verifying is
as ``load_scorer`` does it: the format version, every listed file's sha256 and the content hash; the model id is the
first 12 hex digits of the content hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.errors import ArtifactError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, as the manifest lists it (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_content_hash(manifest: dict[str, Any]) -> str:
    """The sha256 over everything the manifest records but its own hash and the model id (the hash's first 12)."""
    body = {key: value for key, value in manifest.items() if key not in ("content_hash", "model_id")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The verified manifest of ``model_dir``: files and content hash checked."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.exists():
        msg = f"model directory {model_dir} does not exist"
        raise ArtifactError(msg)
    if not path.is_file():
        msg = f"{model_dir} is not a lineinspect model: {MANIFEST} is missing (create one with `lineinspect fit`)"
        raise ArtifactError(msg)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        msg = f"{path} is corrupt: not valid JSON ({error})"
        raise ArtifactError(msg) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        msg = f"{path} is corrupt: not a lineinspect manifest (expected a JSON object with a 'files' object)"
        raise ArtifactError(msg)
    if manifest.get("format_version") != FORMAT_VERSION:
        msg = f"{path}: format version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        raise ArtifactError(msg)
    for name, expected in manifest.get("files", {}).items():
        file = model_dir / name
        if not file.is_file():
            msg = f"{model_dir}: {name} is missing"
            raise ArtifactError(msg)
        if file_sha256(file) != expected:
            msg = f"{model_dir}: {name} does not match its sha256 in the manifest (corrupt or replaced file)"
            raise ArtifactError(msg)
    if manifest.get("content_hash") != manifest_content_hash(manifest):
        msg = f"{path}: content hash does not match (the manifest was edited by hand or is corrupt)"
        raise ArtifactError(msg)
    return dict(manifest)


def verify_model(model_dir: Path) -> dict[str, Any]:
    """The verified manifest of ``model_dir`` with every fusion member's files and content hash checked too, as
    ``load_scorer`` checks them, without loading anything (no backbone, no bank in memory)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    for entry in manifest.get("fusion", []):
        name, content_hash = (str(entry.get("dir")), entry.get("content_hash")) if isinstance(entry, dict) else ("", "")
        check_member(model_dir, name, content_hash, verify_model)
    return manifest


def check_member(model_dir: Path, name: str, content_hash: object,
                 read: Callable[[Path], dict[str, Any]]) -> None:  # fmt: skip
    """Raise unless ``model_dir/name`` is a member directory whose manifest (``read``, which verifies it) has the
    content hash the fused model recorded."""
    if not name or Path(name).name != name or not (model_dir / name).is_dir():
        msg = f"{model_dir}: fusion member directory {name!r} is missing"
        raise ArtifactError(msg)
    if read(model_dir / name)["content_hash"] != content_hash:
        msg = f"{model_dir}/{name} is not the fusion member this model was saved with (content hash differs)"
        raise ArtifactError(msg)
