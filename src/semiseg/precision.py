"""Mixed precision and memory layout: what `train.amp: auto` and `train.channels_last` pick.

`auto` is bf16 on a CUDA device that supports it, else fp16 (with a gradient scaler), and on
a CPU bf16 only where the processor has AMX tiles for it; elsewhere `auto` is fp32. A CPU
without bf16 emulates it, and one with AVX512-BF16 but no AMX is slower in bf16 too: on such
a Xeon (benchmarks/results/step_speed.md) bf16 ran every scheme's step at 0.81-0.88x of fp32,
and channels-last fp32 is the fast setting there.

What autocast leaves in float32, and why: the losses (`cross_entropy` and every unlabeled
loss cast the logits to float32), the teacher probabilities every policy reads
(`semiseg.schemes.teaching.softmax`), DAW's fits and t* (float64 state), FPL's sets and
weights (computed on those float32 probabilities), DARS' histograms (float16 by design, from
float32 softmax), BatchNorm's running statistics (float32 buffers) and evaluation (the
engine evaluates in float32). Pixel features reach a policy in the autocast dtype: rank
weighting's top-k sets of bf16 features see more ties, broken by dimension index.
"""

from __future__ import annotations

import torch

from semiseg.environment import read_cpuinfo

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
_BF16_FLAGS = ("amx_bf16",)


def cpu_has_native_bf16() -> bool:
    """The processor has fast bf16 matrix arithmetic (AMX), read from /proc/cpuinfo. No
    /proc (macOS, Windows) reads as no: fp32, the safe choice; `train.amp=bf16` forces bf16."""
    flags = read_cpuinfo().get("flags", "").split()
    return any(flag in flags for flag in _BF16_FLAGS)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on `device`; None runs in float32."""
    if amp != "auto":
        return AMP_DTYPES[amp]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def describe(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
