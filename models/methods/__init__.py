"""Anomaly-detection methods, selected per line by ``[model] method`` in config.toml.

Each method lives in its own module and implements ``models.methods.base.AnomalyMethod``; this registry maps the
config name to it. Modules are imported on first use, so a line running PatchCore never imports the others.
"""

from __future__ import annotations

import importlib

from models.methods.base import AnomalyMethod

METHOD_CLASSES: dict[str, str] = {
    "patchcore": "models.methods.patchcore:PatchCoreMethod",
    "patchsvdd": "models.methods.patchsvdd:PatchSVDDMethod",
    "gaussian": "models.methods.gaussian:GaussianMethod",
    "padim": "models.methods.padim:PadimMethod",
    "cfa": "models.methods.cfa:CFAMethod",
    "npad": "models.methods.npad:NpadMethod",
}


def method_class(name: str) -> type[AnomalyMethod]:
    """The class implementing method ``name``; ValueError naming the known methods otherwise."""
    if name not in METHOD_CLASSES:
        msg = f"unknown method {name!r}; known methods: {', '.join(sorted(METHOD_CLASSES))}"
        raise ValueError(msg)
    module_name, class_name = METHOD_CLASSES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, AnomalyMethod)):
        msg = f"{METHOD_CLASSES[name]} is not an AnomalyMethod"
        raise TypeError(msg)
    return cls
