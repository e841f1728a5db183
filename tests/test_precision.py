"""`train.amp: auto`: bf16 only where the hardware computes it; explicit settings win."""

from __future__ import annotations

import torch

from semiseg import environment, precision


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.autocast_dtype("auto", cpu) is None
    assert precision.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert precision.autocast_dtype("off", cpu) is None
    assert precision.describe(None) == "fp32"


def test_the_bf16_probe_reads_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(environment, "CPUINFO", info)
    info.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    assert precision.cpu_has_native_bf16() is False
    # AVX512-BF16 without AMX was slower in bf16 than in fp32 (benchmarks/results/step_speed.md).
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert precision.cpu_has_native_bf16() is False
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert precision.cpu_has_native_bf16() is True
