"""Batch norms folded into the convolutions before them, for frozen backbones at inference.

An eval-mode batch norm after a convolution is an affine map per channel, ``y = (conv(x) - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so it can be folded into the convolution: weights ``W * s`` (per output channel),
bias ``(b - mean) * s + beta``. The batch norm then does nothing but its activation (timm's ``BatchNormAct2d``) and
is replaced by that activation, or by an identity. On our 2-core CPU the batch norms were 13% of the default model's
scoring time (a separate pass over every stage's activations; RESULTS.md section 2, session 14).

Which convolution feeds which batch norm is read from one forward pass over a small sample: a batch norm is folded
when its input is the very tensor a convolution returned. The network's output on the sample is compared before
and after; a difference beyond float rounding (a convolution whose output also went elsewhere) raises.
Module names stay, so hooks on a folded batch norm see what it returned before: its activation's output.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def _replacement(norm: nn.BatchNorm2d) -> nn.Module:
    """What is left of a folded batch norm: its activation (and drop path, for timm's BatchNormAct2d), else nothing."""
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    kept = [module for module in (drop, act) if isinstance(module, nn.Module)]
    return nn.Sequential(*kept) if kept else nn.Identity()


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    assert norm.running_mean is not None and norm.running_var is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = -norm.running_mean * scale
    if norm.bias is not None:
        bias = bias + norm.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


@torch.no_grad()
def fold_batch_norms(network: nn.Module, sample: torch.Tensor) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` into it, in place; returns how many.

    ``network`` must be in eval mode; ``sample`` is a small input batch it accepts, e.g. ``(1, 3, 64, 64)``.
    """
    if network.training:
        msg = "batch norms can only be folded in eval mode (running statistics)"
        raise ValueError(msg)
    # each convolution's output, kept alive so that no later tensor can take its id
    producers: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        producers[id(output)] = (module, output)

    def before_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.BatchNorm2d)
        conv, output = producers.get(id(inputs[0]), (None, None))
        if conv is not None and output is inputs[0] and module.track_running_stats:
            pairs.append((conv, module))

    modules = list(network.modules())
    handles = [module.register_forward_hook(after_conv) for module in modules if isinstance(module, nn.Conv2d)]
    norms = [module for module in modules if isinstance(module, nn.BatchNorm2d)]
    handles += [module.register_forward_pre_hook(before_norm) for module in norms]
    try:
        reference = network(sample)
    finally:
        for handle in handles:
            handle.remove()
    # a module called more than once (shared weights) is left alone
    uses = Counter([id(conv) for conv, _ in pairs] + [id(norm) for _, norm in pairs])
    pairs = [(conv, norm) for conv, norm in pairs if uses[id(conv)] == 1 and uses[id(norm)] == 1]
    parents = {id(child): (parent, name) for parent in network.modules() for name, child in parent.named_children()}
    for conv, norm in pairs:
        _fold(conv, norm)
        parent, name = parents[id(norm)]
        setattr(parent, name, _replacement(norm))
    result = network(sample)
    if isinstance(reference, torch.Tensor) and isinstance(result, torch.Tensor):
        scale = reference.abs().max().clamp_min(1.0)
        if not torch.allclose(result, reference, rtol=1e-3, atol=1e-4 * float(scale)):
            change = float((result - reference).abs().max())
            msg = (f"folding batch norms changed the network's output by up to {change}: a convolution's output also "
                   "feeds something other than its batch norm")  # fmt: skip
            raise RuntimeError(msg)
    return len(pairs)
