"""Errors raised by the model stack that callers catch without importing torch (the CLI, the workers)."""

from __future__ import annotations


class BackboneError(RuntimeError):
    """A backbone that cannot be built or whose weights cannot be loaded offline."""


class ArtifactError(RuntimeError):
    """A model directory that is missing, corrupt, or does not match this installation."""
