"""Encoders that turn an image into the three feature maps the decoders consume.

Every backbone returns :class:`BackboneFeatures` for an input ``[B, 3, H, W]``:

- ``low``:  ``[B, low_channels,  ceil(H/4),  ceil(W/4)]``  (DeepLabV3+ skip connection)
- ``mid``:  ``[B, mid_channels,  ~H/16 or H/8, ...]``      (stage 3, PSPNet auxiliary head)
- ``high``: ``[B, high_channels, ~H/os, ~W/os]``           (``os`` = output stride, 8 or 16)

Output stride 16 or 8 is reached by replacing the stride of the last one or two stages
with dilation, as in DeepLab, so the pretrained weights keep their shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor

from semiseg.models.depthwise import SamePadDepthwiseConv2d

BACKBONES = ("resnet50", "resnet101", "efficientnet_lite0", "tiny")
OUTPUT_STRIDES = (8, 16)


class BackboneFeatures(NamedTuple):
    """Feature maps of one forward pass (shapes in the module docstring)."""

    low: Tensor
    mid: Tensor
    high: Tensor


class Backbone(nn.Module):
    """Common interface of the encoders.

    Attributes:
        name: the name ``build_backbone`` knows it by.
        low_channels, mid_channels, high_channels: channels of the three feature maps.
        output_stride: input size / ``high`` size (8 or 16).
        dropped_prefixes: state-dict key prefixes of classification checkpoints that this
            encoder does not have (classifier layers); ignored when loading weights.
    """

    name: str
    low_channels: int
    mid_channels: int
    high_channels: int
    output_stride: int
    dropped_prefixes: tuple[str, ...] = ("fc.", "_fc.")

    def forward(self, x: Tensor) -> BackboneFeatures:
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """torchvision ResNet-50/101 without ``avgpool``/``fc``.

    low = ``layer1`` (256 ch, stride 4), mid = ``layer3`` (1024 ch), high = ``layer4``
    (2048 ch). Submodules keep torchvision's names, so a torchvision classification state
    dict loads after dropping ``fc.*``.
    """

    def __init__(self, depth: int, output_stride: int):
        super().__init__()
        # Output stride 16 dilates layer4; 8 also dilates layer3.
        dilate = [False, output_stride == 8, True]
        arch = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
        net = arch(weights=None, replace_stride_with_dilation=dilate)
        self.name = f"resnet{depth}"
        self.output_stride = output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.low_channels, self.mid_channels, self.high_channels = 256, 1024, 2048

    def forward(self, x: Tensor) -> BackboneFeatures:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        mid = self.layer3(self.layer2(low))
        high = self.layer4(mid)
        return BackboneFeatures(low, mid, high)


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 from ``efficientnet_lite_pytorch``, without its classifier.

    The 16 MBConv blocks form 7 stages; taps (block indices into ``_blocks``):

    ====  ======  ==============  =========================  ==========================
    tap   block   channels        stride, output stride 16   stride, output stride 8
    ====  ======  ==============  =========================  ==========================
    low   2       24 (stage 2)    4                          4
    mid   10      112 (stage 5)   16                         8
    high  15      320 (stage 7)   16                         8
    ====  ======  ==============  =========================  ==========================

    The 1x1 ``_conv_head`` (320 -> 1280) and ``_fc`` are dropped: the decoders start
    from the 320-channel stage-7 output, which keeps the ASPP/PPM convolutions small.

    For output stride 16 the stride-2 depthwise conv opening stage 6 (block 11) gets
    stride 1, and every later depthwise conv dilation 2; for output stride 8 the same is
    done from stage 4 (block 5) on, with dilation 2 then 4 (the first block of a
    de-strided stage keeps the previous dilation, as torchvision's ResNet does). The
    package's convs compute TensorFlow 'same' padding from the dilation at run time, so
    the dilated convs stay centred and the weights are unchanged.

    The depthwise convolutions are :class:`~semiseg.models.depthwise.SamePadDepthwiseConv2d`
    (the package's padding, float32 under CPU autocast, where bf16 depthwise kernels are slow).

    Two deliberate changes from the package defaults: the model is built with
    ``image_size=None`` so the padding is computed per input (its static padding is
    precomputed for 224x224 inputs and would misalign other sizes), and BatchNorm momentum
    is set to PyTorch's 0.1 instead of the TensorFlow-ported 0.01, so the running
    statistics follow the new domain within the short schedules used for segmentation.
    Stochastic depth (drop-connect, 0.2 scaled by block depth) is kept as in the package.

    Expected input normalisation: ImageNet mean/std (as in the package's own example).
    """

    dropped_prefixes = ("fc.", "_fc.", "_conv_head.", "_bn1.")
    LOW_BLOCK, MID_BLOCK = 2, 10
    # First block of stages 4 and 6, the stride-2 blocks after the low-level tap.
    STAGE4_START, STAGE6_START = 5, 11

    def __init__(self, output_stride: int):
        super().__init__()
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        self.name = "efficientnet_lite0"
        self.output_stride = output_stride
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        for block in self._blocks:
            block._depthwise_conv = SamePadDepthwiseConv2d.replacing(block._depthwise_conv)
        self.act = nn.ReLU6(inplace=True)
        self.drop_connect_rate: float = net._global_params.drop_connect_rate or 0.0
        self.low_channels = self._blocks[self.LOW_BLOCK]._block_args.output_filters
        self.mid_channels = self._blocks[self.MID_BLOCK]._block_args.output_filters
        self.high_channels = self._blocks[-1]._block_args.output_filters
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        self._dilate(self.STAGE6_START if output_stride == 16 else self.STAGE4_START)

    def _dilate(self, first: int) -> None:
        """Replace every stride-2 depthwise conv from block ``first`` on by dilation."""
        dilation = 1
        for block in list(self._blocks)[first:]:
            conv = block._depthwise_conv
            conv.dilation = (dilation, dilation)
            if conv.stride[0] == 2:
                conv.stride = (1, 1)
                dilation *= 2

    def forward(self, x: Tensor) -> BackboneFeatures:
        x = self.act(self._bn0(self._conv_stem(x)))
        taps = {}
        for index, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * index / len(self._blocks))
            if index in (self.LOW_BLOCK, self.MID_BLOCK):
                taps[index] = x
        return BackboneFeatures(taps[self.LOW_BLOCK], taps[self.MID_BLOCK], x)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(Backbone):
    """A small plain CNN (~0.1 M parameters) with the same feature interface.

    Random initialisation only, no pretrained weights: meant for unit tests, debugging and
    smoke runs, not for accuracy. Stages of 3x3 conv-BN-ReLU: stride 2 (16 ch), 4 (24 ch,
    low), 8 (32 ch), 16 (48 ch, mid), 16 (64 ch, high); output stride 8 dilates the last
    two stages instead of striding, like the ResNets.
    """

    def __init__(self, output_stride: int):
        super().__init__()
        self.name = "tiny"
        self.output_stride = output_stride
        stride3, dilation3 = (2, 1) if output_stride == 16 else (1, 2)
        dilation4 = 2 * dilation3
        self.stem = _conv_bn_relu(3, 16, stride=2)
        self.layer1 = _conv_bn_relu(16, 24, stride=2)
        self.layer2 = _conv_bn_relu(24, 32, stride=2)
        self.layer3 = _conv_bn_relu(32, 48, stride=stride3, dilation=dilation3)
        self.layer4 = nn.Sequential(
            _conv_bn_relu(48, 64, dilation=dilation4), _conv_bn_relu(64, 64, dilation=dilation4)
        )
        self.low_channels, self.mid_channels, self.high_channels = 24, 48, 64

    def forward(self, x: Tensor) -> BackboneFeatures:
        low = self.layer1(self.stem(x))
        mid = self.layer3(self.layer2(low))
        return BackboneFeatures(low, mid, self.layer4(mid))


def build_backbone(name: str, output_stride: int = 16) -> Backbone:
    """Randomly initialised backbone ``name`` (one of ``BACKBONES``) at ``output_stride``.

    Raises:
        ValueError: unknown name or output stride not in {8, 16}.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if name == "resnet50":
        return ResNetBackbone(50, output_stride)
    if name == "resnet101":
        return ResNetBackbone(101, output_stride)
    if name == "efficientnet_lite0":
        return EfficientNetLite0Backbone(output_stride)
    if name == "tiny":
        return TinyBackbone(output_stride)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
