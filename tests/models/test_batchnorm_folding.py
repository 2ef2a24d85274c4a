"""Batch norms folded into convolutions: same outputs, nothing left to normalise, unsafe graphs refused."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from models.batchnorm_folding import fold_batch_norms


def randomised(network: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with non-trivial statistics and affine parameters, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for norm in (module for module in network.modules() if isinstance(module, nn.BatchNorm2d)):
        assert norm.running_mean is not None and norm.running_var is not None
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.2)
        norm.weight.data.copy_(torch.randn(norm.num_features, generator=generator))
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator))
    return network.eval()


class SharedOutput(nn.Module):
    """A convolution whose output feeds its batch norm and a residual sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


def test_folded_network_computes_the_same() -> None:
    network = randomised(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, groups=8, bias=True), nn.BatchNorm2d(8)))  # fmt: skip
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = network(images)
    assert fold_batch_norms(network, torch.randn(1, 3, 16, 16)) == 2
    assert not any(isinstance(module, nn.BatchNorm2d) for module in network.modules())
    with torch.no_grad():
        torch.testing.assert_close(network(images), expected, rtol=1e-5, atol=1e-5)


def test_timm_batch_norm_keeps_its_activation_under_its_name() -> None:
    network = randomised(nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8, act_layer=nn.ReLU6)))
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = network(images)
    fold_batch_norms(network, images[:1])
    seen: list[torch.Tensor] = []
    network.get_submodule("1").register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        torch.testing.assert_close(network(images), expected, rtol=1e-5, atol=1e-5)
    assert seen and float(seen[0].min()) >= 0.0 and float(seen[0].max()) <= 6.0  # ReLU6 still applied


def test_a_convolution_output_used_twice_is_refused() -> None:
    with pytest.raises(RuntimeError, match="also feeds"):
        fold_batch_norms(randomised(SharedOutput()), torch.randn(1, 4, 8, 8))


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), torch.randn(1, 3, 4, 4))
