"""Depthwise convolutions that stay in float32 under CPU autocast.

Why: oneDNN's bfloat16 depthwise convolution is slow on CPUs, even on those with AMX tiles
(which speed up dense convolutions only). On a 2-core Xeon with AMX
(`benchmarks/results/step_speed.md`, run 6), the backward of EfficientNet-Lite0's dilated
5x5 depthwise convolution over 1152 channels took 66 ms in bf16 channels-last against 25 ms
in fp32, and the backbone's depthwise convolutions were half of a bf16 UniMatch step. In
float32 they run at the fp32 rate, and the dense convolutions around them keep bf16.

Under CUDA autocast, or without autocast, these are plain `nn.Conv2d`: the parameters, the
state-dict keys and the fp32 arithmetic are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (any torch since 2.1)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


class DepthwiseConv2d(nn.Conv2d):
    """`nn.Conv2d` with groups == in_channels whose arithmetic is float32 under CPU
    autocast: [B, C, H, W] -> [B, C, H', W'] in the input's dtype (a bf16 input is widened,
    convolved in float32 and rounded back, so the BatchNorm and activation after it run as
    they did; keeping their float32 output was slower, its casts and mixed layouts cost more
    than the precision was worth). Elsewhere the usual autocast rules apply."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._depthwise(input, self.padding)

    def _depthwise(self, x: Tensor, padding: tuple[int, ...] | str) -> Tensor:
        if x.device.type == "cpu" and cpu_autocast_enabled():
            with torch.autocast("cpu", enabled=False):
                return self._depthwise(x.float(), padding).to(x.dtype)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class SamePadDepthwiseConv2d(DepthwiseConv2d):
    """A depthwise convolution with TensorFlow's 'same' padding computed per input, as
    `efficientnet_lite_pytorch`'s `Conv2dDynamicSamePadding` does (output size
    ceil(input / stride), the extra pixel of an odd total padding on the bottom/right), so
    that the package's weights give the same outputs."""

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> SamePadDepthwiseConv2d:
        """A copy of the package's depthwise `conv` (same parameters, stride, dilation)."""
        if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
            raise ValueError(f"not a depthwise convolution: {conv}")
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        pad = []
        for size, kernel, stride, dilation in zip(
            reversed(x.shape[-2:]),
            reversed(self.kernel_size),
            reversed(self.stride),
            reversed(self.dilation),
            strict=True,
        ):
            total = max(
                (math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0
            )
            pad += [total // 2, total - total // 2]
        if pad[0] == pad[1] and pad[2] == pad[3]:
            # The convolution's own zero padding: an explicit copy of the padded input cost
            # about a tenth of a bf16 UniMatch step on CPU.
            return self._depthwise(x, (pad[2], pad[0]))
        return self._depthwise(F.pad(x, pad), 0)
