import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from models.backbones import BACKBONES, LITE_VARIANTS, build_efficientnet_lite, lite_key_map, load_backbone
from models.errors import BackboneError
from pipeline.config import BackboneName


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_shipped_lite_weights_classify_chelsea_as_a_cat(variant: int) -> None:
    model = build_efficientnet_lite(variant).eval()
    image = cv2.resize(skimage.data.chelsea(), (224, 224)).astype(np.float32) / 255.0
    batch = (torch.from_numpy(image).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.inference_mode():
        top = int(model(batch).argmax())
    assert 281 <= top <= 285, f"predicted ImageNet class {top}, expected a cat (281-285)"


def test_tapped_maps_equal_the_plain_layout_network() -> None:
    """The backbone runs channels-last for speed; its features must be those of the network as built (NCHW)."""
    backbone = load_backbone("efficientnet_lite0")
    plain = build_efficientnet_lite(0).eval()
    captured: dict[str, torch.Tensor] = {}
    modules = dict(plain.named_modules())
    for layer in backbone.layers:
        modules[layer].register_forward_hook(lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out))
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        fast = backbone(images)
        plain(backbone.normalise(images))
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for layer, features in zip(backbone.layers, fast, strict=True):
        torch.testing.assert_close(features, captured[layer], rtol=1e-4, atol=1e-4)


def test_key_map_places_flat_blocks_into_stages() -> None:
    lite0, lite2 = (1, 2, 2, 3, 3, 4, 1), (1, 3, 3, 4, 4, 5, 1)
    assert lite_key_map("_blocks.0._depthwise_conv.weight", lite0) == "blocks.0.0.conv_dw.weight"
    assert lite_key_map("_blocks.3._expand_conv.weight", lite0) == "blocks.2.0.conv_pw.weight"
    assert lite_key_map("_blocks.3._expand_conv.weight", lite2) == "blocks.1.2.conv_pw.weight"
    assert lite_key_map("_blocks.15._project_conv.weight", lite0) == "blocks.6.0.conv_pwl.weight"
    assert lite_key_map("_blocks.20._project_conv.weight", lite2) == "blocks.6.0.conv_pwl.weight"
    assert lite_key_map("_fc.bias", lite0) == "classifier.bias"


def test_weights_of_another_layout_are_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "renamed.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match=f"{path}.*not in the shipped layout"):
        build_efficientnet_lite(1, path)


@pytest.mark.parametrize(("variant", "channels"), [(1, [40, 112]), (2, [48, 120])])
def test_deeper_lites_tap_the_same_strides(variant: int, channels: list[int]) -> None:
    backbone = load_backbone(f"efficientnet_lite{variant}")
    with torch.inference_mode():
        maps = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(channels[0], 8, 8), (channels[1], 4, 4)]


def test_default_backbone_taps_stride_8_and_16() -> None:
    backbone = load_backbone("efficientnet_lite0")
    with torch.inference_mode():
        maps = backbone(torch.rand(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]


def test_missing_torchvision_weights_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "wide_resnet50_2.pth"
    with pytest.raises(BackboneError, match=str(missing)) as error:
        load_backbone("wide_resnet50_2", weights_path=missing)
    assert "model.weights_path" in str(error.value)


def test_resnet18_loads_from_a_local_weights_file(tmp_path: Path) -> None:
    """The file's weights, batch-norm statistics included, give the maps: the reference network's own layer2 and
    layer3 outputs (the backbone folds its batch norms into the convolutions)."""
    generator = torch.Generator().manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    for norm in (module for module in reference.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        assert norm.running_mean is not None and norm.running_var is not None
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.weight.data.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = load_backbone("resnet18", weights_path=path)
    captured: dict[str, torch.Tensor] = {}
    for layer in backbone.layers:
        reference.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out))  # fmt: skip
    images = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        maps = backbone(images)
        reference(backbone.normalise(images))
    assert [m.shape[1] for m in maps] == [128, 256]
    for layer, features in zip(backbone.layers, maps, strict=True):
        torch.testing.assert_close(features, captured[layer], rtol=1e-4, atol=1e-4)


def test_unknown_backbone_and_layer_are_reported() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("vgg99")
    with pytest.raises(BackboneError, match="unknown backbone layers"):
        load_backbone("efficientnet_lite0", layers=("blocks.99",))
    assert set(BACKBONES) == set(typing.get_args(BackboneName))  # the config accepts exactly the registered ones


def test_shared_pass_runs_equal_backbones_once_per_input() -> None:
    from models.backbones import shared_backbone_pass

    first, second, between, deeper = (
        load_backbone("efficientnet_lite0"), load_backbone("efficientnet_lite0"),
        load_backbone("efficientnet_lite0", ("blocks.2", "blocks.3", "blocks.4")),
        load_backbone("efficientnet_lite0", ("blocks.2", "blocks.5")),
    )  # fmt: skip
    runs: list[str] = []
    for name, backbone in (("first", first), ("second", second), ("between", between), ("deeper", deeper)):
        backbone.network.register_forward_pre_hook(lambda *_, name=name: runs.append(name))
    images, other = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        alone, alone_between = second(images), between(images)
        runs.clear()
        with shared_backbone_pass():
            shared = [first(images), second(images), between(images), deeper(images), second(other), first(other)]
            # same weights and tensor: one pass, reused by a backbone whose layers all lie within it (blocks.3 is a
            # stage the first pass kept); blocks.5 lies beyond it, and another tensor is another pass
            assert runs == ["first", "deeper", "second"]
        after = second(images)
    for mine, reference in zip([*shared[1], *shared[2]], [*alone, *alone_between], strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    assert shared[0][0] is shared[1][0] is shared[2][0] and shared[4][1] is shared[5][1]
    assert after[0] is not shared[1][0] and runs[-1] == "second"  # outside the block nothing is shared


def test_a_pass_at_224_px_keeps_every_activation_under_the_mmap_threshold() -> None:
    """Blocks above glibc's mmap threshold are mapped afresh and page-faulted in on every pass (models.native)."""
    from models.backbones import images_per_pass
    from models.native import MMAP_THRESHOLD_BYTES

    backbone = load_backbone("efficientnet_lite0", ("blocks.2", "blocks.3", "blocks.4"))
    largest: list[int] = []
    for module in backbone.network.modules():
        module.register_forward_hook(lambda _m, _i, out: largest.append(out.nbytes) if torch.is_tensor(out) else None)
    per_pass = images_per_pass(224, 224)
    with torch.inference_mode():
        backbone(torch.rand(3 * per_pass, 3, 224, 224))
    assert 4 <= per_pass <= 8  # the batch still amortises each layer's overheads
    assert MMAP_THRESHOLD_BYTES / 2 < max(largest) < MMAP_THRESHOLD_BYTES  # under it, with little to spare


def test_large_batches_run_in_chunks_with_the_same_maps() -> None:
    from models.backbones import FORWARD_CHUNK

    backbone = load_backbone("efficientnet_lite0")
    runs: list[int] = []
    backbone.network.register_forward_pre_hook(lambda _module, inputs: runs.append(inputs[0].shape[0]))
    images = torch.rand(FORWARD_CHUNK + 3, 3, 64, 64)
    with torch.inference_mode():
        chunked = backbone(images)
        each = [backbone(image[None]) for image in images]
    assert runs[0] == FORWARD_CHUNK and runs[1] == 3  # then one pass per image above
    for layer, features in enumerate(chunked):
        assert features.shape[0] == images.shape[0]
        torch.testing.assert_close(features, torch.cat([maps[layer] for maps in each]), rtol=1e-4, atol=1e-4)
