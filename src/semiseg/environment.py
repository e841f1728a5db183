"""Where a run trained: the machine and software of each start or resume of a run.

The same command, seed and data give different results on different CPUs (bf16 kernels
differ between AVX-512 and AMX; a 1-2 mIoU point spread at one seed on CamVid), so a
comparison of runs has to know which machine ran which run. Every start of a training run
appends one `describe()` record to the run folder's `environment.jsonl`; a resume on
another machine appends a second one.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")

# The CPU features that change which bf16 kernels run.
_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "amx_tile", "avx512f", "avx2")


def read_cpuinfo(path: Path | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `vendor_id`, `flags`,
    ...); empty where there is no such file (macOS, Windows)."""
    try:
        text = (path or CPUINFO).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(path: Path | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and which of the bf16-relevant feature flags it has; the
    model falls back to `platform.processor()` where /proc/cpuinfo is absent."""
    fields = read_cpuinfo(path)
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, [f for f in _CPU_FLAGS if f in flags]


def cpu_vendor() -> str:
    """The CPU's vendor string (`GenuineIntel`, `AuthenticAMD`), or `unknown`. The kernel
    family alone does not fix the bits: an AMD EPYC and an Intel Xeon that both report
    AVX512 differ in the last bit from the first optimiser step on (observed 2026-12-04),
    with the same code and torch build."""
    return read_cpuinfo().get("vendor_id") or platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device: torch.device | str = "cpu") -> dict:
    """One JSON-ready record of this process's machine: time, CPU model, vendor, flags and
    the kernel family torch picked for it, the cores it may use, torch's threads, the
    Python, torch and semiseg versions, and for a CUDA device its name."""
    model, flags = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "cpu_vendor": cpu_vendor(),
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "semiseg": _version("semiseg"),
        "device": str(device),
    }
    device = torch.device(device)
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def machine_label(record: dict) -> str:
    """A short name of a machine for tables: the GPU where a run used one, else the CPU
    with its widest bf16 feature (model names such as "Intel(R) Xeon(R) Processor" do not
    tell the generations apart) and its core count; then the torch version."""
    where = record.get("gpu")
    if where is None:
        bf16 = [f for f in record.get("cpu_flags", []) if f in ("amx_bf16", "avx512_bf16")]
        where = (
            f"{record.get('cpu', '?')}{f' ({bf16[0]})' if bf16 else ''} x{record.get('cores', '?')}"
        )
    return f"{where}, torch {record.get('torch', '?')}"
