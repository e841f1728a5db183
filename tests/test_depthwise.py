"""Depthwise convolutions: the package's 'same' padding kept exactly; float32 arithmetic
under CPU autocast (bf16 depthwise kernels are slow there), the input's dtype out."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

from semiseg.models import build_model
from semiseg.models.depthwise import DepthwiseConv2d, SamePadDepthwiseConv2d


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 1, 1), (5, 2, 1), (5, 1, 2), (3, 2, 1)])
@pytest.mark.parametrize("size", [(9, 12), (10, 10), (37, 41)])
def test_same_padding_matches_the_package_bit_for_bit(kernel, stride, dilation, size):
    torch.manual_seed(0)
    package = Conv2dDynamicSamePadding(6, 6, kernel, stride, groups=6, bias=False)
    package.dilation = (dilation, dilation)
    ours = SamePadDepthwiseConv2d.replacing(package)
    x = torch.randn(2, 6, *size)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        assert torch.equal(ours(x), package(x))


def test_replacing_refuses_a_dense_convolution():
    with pytest.raises(ValueError, match="not a depthwise"):
        SamePadDepthwiseConv2d.replacing(torch.nn.Conv2d(4, 4, 3))


def test_cpu_autocast_convolves_in_float32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    conv = DepthwiseConv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(2, 8, 7, 7).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    # float32 arithmetic on the bf16 input, rounded once at the end.
    expected = torch.nn.functional.conv2d(x.float(), conv.weight, None, 1, 1, 1, 8).bfloat16()
    assert torch.equal(out, expected)
    plain = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    plain.load_state_dict(conv.state_dict())
    assert torch.equal(conv(x.float()), plain(x.float()))


def test_models_use_them_and_keep_their_state_dict_keys():
    model = build_model("deeplabv3plus", "efficientnet_lite0", 11, decoder="light")
    depthwise = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    # 16 MBConv blocks, ASPP's 3 atrous branches and the decoder's 2 convolutions.
    assert len(depthwise) == 16 + 3 + 2
    keys = set(model.state_dict())
    assert "backbone._blocks.15._depthwise_conv.weight" in keys
    assert not any(".conv." in k for k in keys)
