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

# The CPU features that change which bf16 kernels run.
_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "amx_tile", "avx512f", "avx2")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's model name and which of the bf16-relevant feature flags it has; the
    model falls back to `platform.processor()` where /proc/cpuinfo is absent (not Linux)."""
    model, flags = "", set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), [
        f for f in _CPU_FLAGS if f in flags
    ]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device: torch.device | str = "cpu") -> dict:
    """One JSON-ready record of this process's machine: time, CPU model and flags, the
    cores it may use, torch's threads, the Python, torch and semiseg versions, and for a
    CUDA device its name."""
    model, flags = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "cpu_flags": flags,
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
