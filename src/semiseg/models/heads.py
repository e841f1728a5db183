"""Segmentation decoders: DeepLabV3+ and PSPNet.

A head maps :class:`~semiseg.models.backbones.BackboneFeatures` to a :class:`HeadOutput`
at decoder resolution; :class:`~semiseg.models.segmentor.SegmentationModel` upsamples the
logits to the input size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semiseg.models.backbones import BackboneFeatures
from semiseg.models.depthwise import DepthwiseConv2d


class HeadOutput(NamedTuple):
    """``features`` [B, D, h, w] (after ReLU, before the classifier), ``logits`` [B, C, h, w],
    ``aux`` [B, C, h', w'] auxiliary logits or None."""

    features: Tensor
    logits: Tensor
    aux: Tensor | None


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, since BN follows) -> BatchNorm -> ReLU, spatial size preserved."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def separable_conv_bn_relu(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise-separable 3x3: depthwise 3x3 conv-BN-ReLU then pointwise 1x1 conv-BN-ReLU,
    as in the DeepLabV3+ paper's Xception ASPP and decoder; about 9 / (1 + 9 c_in / c_out)
    of the multiply-adds of a full 3x3 convolution for a wide one. The depthwise part stays
    float32 under CPU autocast (:mod:`semiseg.models.depthwise`)."""
    return nn.Sequential(
        DepthwiseConv2d(
            c_in, c_in, 3, padding=dilation, dilation=dilation, groups=c_in, bias=False
        ),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        conv_bn_relu(c_in, c_out, 1),
    )


def conv3x3_bn_relu(
    c_in: int, c_out: int, dilation: int = 1, separable: bool = False
) -> nn.Sequential:
    """A 3x3 conv-BN-ReLU, full or depthwise-separable."""
    if separable:
        return separable_conv_bn_relu(c_in, c_out, dilation)
    return conv_bn_relu(c_in, c_out, 3, dilation=dilation)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., DeepLabV3).

    A 1x1 branch, one 3x3 branch per atrous rate and an image-pooling branch, concatenated
    and projected by 1x1 conv-BN-ReLU: [B, in_channels, h, w] -> [B, out_channels, h, w].
    `separable` makes the atrous branches depthwise-separable.

    The image-pooling branch normalises a [B, out_channels, 1, 1] tensor, so in training
    mode it needs a batch of at least 2 (per process, or across processes with SyncBN).
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...], separable: bool = False
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1)]
            + [conv3x3_bn_relu(in_channels, out_channels, rate, separable) for rate in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels, 1)
        )
        self.project = conv_bn_relu(out_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder (Chen et al., ECCV 2018), as used by CPS, AEL and UniMatch.

    ASPP (`channels`, 256 in the papers) on ``high``, upsampled to the stride-4 ``low``
    features, which are projected to 48 channels; two 3x3 conv-BN-ReLU (`channels`) give
    ``features`` [B, channels, H/4, W/4]; a 1x1 conv gives the logits. At a 160 x 160 crop
    those two stride-4 convolutions are three quarters of a DeepLabV3+ EfficientNet-Lite0's
    FLOPs: `separable` makes them and ASPP's atrous branches depthwise-separable (the
    DeepLabV3+ paper's Xception variant), the light decoder of the CPU presets.

    Args:
        atrous_rates: ASPP rates; (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        atrous_rates: tuple[int, ...] = (6, 12, 18),
        channels: int = 256,
        separable: bool = False,
    ):
        super().__init__()
        self.feature_dim = channels
        self.aspp = ASPP(high_channels, channels, atrous_rates, separable)
        self.reduce = conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(
            conv3x3_bn_relu(channels + 48, channels, separable=separable),
            conv3x3_bn_relu(channels, channels, separable=separable),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: BackboneFeatures) -> HeadOutput:
        low = self.reduce(feats.low)
        high = F.interpolate(
            self.aspp(feats.high), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        features = self.fuse(torch.cat([high, low], dim=1))
        return HeadOutput(features, self.classifier(features), None)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., CVPR 2017).

    For each bin size b the input is average-pooled to b x b, reduced to
    ``in_channels // len(bins)`` channels by 1x1 conv-BN-ReLU and upsampled back; the input
    and all levels are concatenated: [B, in, h, w] -> [B, out_channels, h, w] with
    ``out_channels = in + len(bins) * (in // len(bins))``.
    """

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        reduced = in_channels // len(bins)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, reduced, 1))
            for b in bins
        )
        self.out_channels = in_channels + len(bins) * reduced

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(level(x), size=size, mode="bilinear", align_corners=False)
            for level in self.levels
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPNetHead(nn.Module):
    """PSPNet decoder with its auxiliary head, as in the PSPNet/DARS code.

    Main: pyramid pooling (bins 1, 2, 3, 6) on ``high`` -> 3x3 conv-BN-ReLU 512 =
    ``features`` [B, 512, H/os, W/os] -> Dropout2d(0.1) -> 1x1 classifier.
    Auxiliary (training mode only, else None): 3x3 conv-BN-ReLU 256 -> Dropout2d(0.1) ->
    1x1 classifier on the stage-3 ``mid`` features.
    """

    feature_dim = 512

    def __init__(
        self,
        mid_channels: int,
        high_channels: int,
        num_classes: int,
        bins: tuple[int, ...] = (1, 2, 3, 6),
    ):
        super().__init__()
        self.ppm = PyramidPooling(high_channels, bins)
        self.bottleneck = conv_bn_relu(self.ppm.out_channels, 512, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(512, num_classes, 1)
        self.aux_head = nn.Sequential(
            conv_bn_relu(mid_channels, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1)
        )

    def forward(self, feats: BackboneFeatures) -> HeadOutput:
        features = self.bottleneck(self.ppm(feats.high))
        logits = self.classifier(self.dropout(features))
        aux = self.aux_head(feats.mid) if self.training else None
        return HeadOutput(features, logits, aux)
