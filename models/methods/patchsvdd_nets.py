"""Patch SVDD's networks: patch encoders trained from scratch, and the relative-position classifier.

- ``BaseEncoder(patch_size, dim)``: a stack of valid (unpadded) 3x3 convolutions, the first with stride 2, that maps
  a ``(B, 3, K, K)`` patch (K = 16 or 32) to ``(B, D, 1, 1)``; the 32-pixel one is the official code's
  ``EncoderDeep`` (widths 32-64-128-128-64-32-32-D, leaky ReLU 0.1, tanh output). Because no layer pads, the same
  network run on a whole image ``(N, 3, H, W)`` gives the embedding of every K-pixel patch at pixel stride 2:
  ``dense(images)[..., i, j]`` equals ``forward(images[..., 2i:2i+K, 2j:2j+K])``.
- ``HierarchicalEncoder(inner)``: a 2K-pixel encoder made of four K-pixel ones (the paper's hierarchy): the inner
  encoder embeds the four quadrants, a 2x2 convolution combines them and a 1x1 convolution projects to D (tanh).
  Densely, the quadrants of the patch at grid position ``(i, j)`` sit ``K / 2`` grid steps apart, so the 2x2
  convolution becomes a dilated one over the inner dense map: again every 2K-pixel patch at pixel stride 2.
- ``PatchEncoders``: the encoder chain for all scales (e.g. 32 -> 64, or 16 -> 32 -> 64 for the multi-scale
  variant) plus the training images' channel mean used to standardise inputs (the official code subtracts it).
- ``PositionClassifier``: a small MLP on the difference of two patch embeddings -> logits over the 8 neighbour
  positions (the self-supervised task).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

LEAK = 0.1
BASE_WIDTHS: dict[int, tuple[int, ...]] = {
    16: (32, 64, 64),  # conv s2 16 -> 7, then 3 valid 3x3 convs -> 1
    32: (32, 64, 128, 128, 64, 32, 32),  # the official EncoderDeep: conv s2 32 -> 15, then 7 valid 3x3 convs -> 1
}


class BaseEncoder(nn.Module):
    """``(B, 3, K, K)`` -> ``(B, D, 1, 1)``; on a larger input, one embedding per K-pixel patch at pixel stride 2."""

    patch_size: int
    dim: int

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        if patch_size not in BASE_WIDTHS:
            msg = f"the smallest patch encoder must be {sorted(BASE_WIDTHS)} pixels, got {patch_size}"
            raise ValueError(msg)
        widths = (*BASE_WIDTHS[patch_size], dim)
        layers = [nn.Conv2d(3, widths[0], 3, stride=2)]
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3) for i in range(len(widths) - 1)]
        self.convs = nn.ModuleList(layers)
        self.patch_size = patch_size
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for position, conv in enumerate(self.convs):
            x = conv(x)
            x = torch.tanh(x) if position == len(self.convs) - 1 else F.leaky_relu(x, LEAK)
        return x

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, D, (H - K) // 2 + 1, (W - K) // 2 + 1)``: patch (i, j) starts at pixel (2i, 2j)."""
        return self(images)


class HierarchicalEncoder(nn.Module):
    """A 2K-pixel encoder from four K-pixel ones: ``(B, 3, 2K, 2K)`` -> ``(B, D, 1, 1)``."""

    patch_size: int
    dim: int

    def __init__(self, inner: BaseEncoder | HierarchicalEncoder, hidden: int = 128) -> None:
        super().__init__()
        self.inner = inner
        self.patch_size = 2 * inner.patch_size
        self.dim = inner.dim
        self.combine = nn.Conv2d(inner.dim, hidden, 2)
        self.project = nn.Conv2d(hidden, inner.dim, 1)

    def _head(self, quadrants: torch.Tensor, dilation: int) -> torch.Tensor:
        h = F.leaky_relu(F.conv2d(quadrants, self.combine.weight, self.combine.bias, dilation=dilation), LEAK)
        return torch.tanh(self.project(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.inner.patch_size
        if x.shape[-1] != self.patch_size or x.shape[-2] != self.patch_size:
            msg = f"forward takes {self.patch_size}-pixel patches, got {tuple(x.shape)}; use dense() on images"
            raise ValueError(msg)
        count = x.shape[0]
        quadrants = torch.cat([x[..., :half, :half], x[..., :half, half:], x[..., half:, :half], x[..., half:, half:]])
        h = self.inner(quadrants)  # (4B, D, 1, 1): top-left, top-right, bottom-left, bottom-right
        top = torch.cat([h[:count], h[count : 2 * count]], dim=3)
        bottom = torch.cat([h[2 * count : 3 * count], h[3 * count :]], dim=3)
        return self._head(torch.cat([top, bottom], dim=2), dilation=1)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, D, (H - 2K) // 2 + 1, ...)``: every 2K-pixel patch at pixel stride 2."""
        return self.dense_from_inner(self.inner.dense(images))

    def dense_from_inner(self, inner_dense: torch.Tensor) -> torch.Tensor:
        """The inner encoder's dense map -> this encoder's (quadrants K pixels = K / 2 grid steps apart)."""
        return self._head(inner_dense, dilation=self.inner.patch_size // 2)


class PatchEncoders(nn.Module):
    """The encoder of every scale, smallest first, sharing weights down the hierarchy, plus the input mean."""

    channel_mean: torch.Tensor

    def __init__(self, patch_sizes: tuple[int, ...], dim: int) -> None:
        super().__init__()
        if any(b != 2 * a for a, b in itertools.pairwise(patch_sizes)):
            msg = f"patch sizes must double from scale to scale, got {patch_sizes}"
            raise ValueError(msg)
        encoder: BaseEncoder | HierarchicalEncoder = BaseEncoder(patch_sizes[0], dim)
        encoders: list[BaseEncoder | HierarchicalEncoder] = [encoder]
        for _ in patch_sizes[1:]:
            encoder = HierarchicalEncoder(encoder)
            encoders.append(encoder)
        self.top = encoder  # owns every parameter through .inner
        self.patch_sizes = patch_sizes
        self.dim = dim
        self._encoders = encoders  # plain list: not registered twice in the state dict
        self.register_buffer("channel_mean", torch.zeros(3))
        self.apply(_he_init)

    def encoder(self, patch_size: int) -> BaseEncoder | HierarchicalEncoder:
        return self._encoders[self.patch_sizes.index(patch_size)]

    def standardise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] minus the training images' per-channel mean (the official code's standardisation)."""
        return images - self.channel_mean.view(1, 3, 1, 1)

    def embed_patches(self, patches: torch.Tensor, patch_size: int) -> torch.Tensor:
        """Standardised ``(B, 3, K, K)`` patches -> ``(B, D)``."""
        return self.encoder(patch_size)(patches).flatten(1)

    def dense(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Standardised ``(N, 3, H, W)`` -> per scale ``(N, D, (H - K) // 2 + 1, (W - K) // 2 + 1)``, smallest first;
        one pass of the smallest encoder serves every scale."""
        maps = [self._encoders[0].dense(images)]
        for encoder in self._encoders[1:]:
            assert isinstance(encoder, HierarchicalEncoder)
            maps.append(encoder.dense_from_inner(maps[-1]))
        return maps


def _he_init(module: nn.Module) -> None:
    """He initialisation for leaky ReLU, zero biases. PyTorch's default (used by the official code) shrinks the
    signal by about sqrt(3) per layer, so an untrained 8-layer encoder maps every patch to nearly the same
    bias-driven vector (cosine > 0.99999 between neighbours): with a CPU budget of a few hundred steps the
    encoders must start from informative embeddings."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, a=LEAK, nonlinearity="leaky_relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PositionClassifier(nn.Module):
    """``(B, D)`` embeddings of a patch and of its neighbour -> ``(B, 8)`` logits of the neighbour's position."""

    def __init__(self, dim: int, hidden: int = 128, classes: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc1(first - second), LEAK)
        h = F.leaky_relu(self.fc2(h), LEAK)
        # Class vectors normalised to unit length, as the official NormalizedLinear does (there without a gradient
        # reaching the weights, which leaves them at their random start; here they learn).
        return F.linear(h, F.normalize(self.fc3.weight, dim=1), self.fc3.bias)
