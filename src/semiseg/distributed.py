"""Process-group set-up that degrades to a plain single process.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them nothing distributed is
initialised and the same code runs on one CPU or GPU.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from semiseg.options import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owner: bool = False
    """This context created the process group, so `cleanup` ends it. A nested user (a round
    of self-training inside the multi-round command) leaves it to the outer one: a gloo or
    NCCL group cannot be reliably re-created in the same processes."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """'auto' picks CUDA when present; under torchrun a CUDA process uses its LOCAL_RANK GPU.
    `key` is how the caller's user set `name` (a config key or a command-line flag)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={name!r}, but CUDA is not available on this machine (use cpu or auto)"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


_CU_CTX_SCHED_BLOCKING_SYNC = 0x04


def block_on_cuda_sync() -> None:
    """Make this process's host threads sleep while they wait for a GPU, instead of spinning.

    Sets CU_CTX_SCHED_BLOCKING_SYNC on every GPU's primary context (the one torch uses),
    through the driver, before torch creates it. CUDA's default spins whenever a process has
    fewer contexts than the machine has cores: right for one run per GPU, but dozens of runs
    sharing one GPU and 16 cores then spend the cores their data loaders need on waiting.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise ConfigError(f"train.cuda_sync='block' needs the CUDA driver: {err}") from None

    def call(name: str, *args) -> None:
        code = getattr(driver, name)(*args)
        if code != 0:
            raise RuntimeError(f"train.cuda_sync='block': {name} failed with CUDA error {code}")

    count, device = ctypes.c_int(), ctypes.c_int()
    call("cuInit", 0)
    call("cuDeviceGetCount", ctypes.byref(count))
    for index in range(count.value):
        call("cuDeviceGet", ctypes.byref(device), index)
        call("cuDevicePrimaryCtxSetFlags", device, _CU_CTX_SCHED_BLOCKING_SYNC)


def init_distributed(
    device_name: str = "auto", key: str = "train.device", cuda_sync: str = "auto"
) -> DistContext:
    """Join the process group launched by torchrun (NCCL on GPU, gloo on CPU), or run alone;
    `key` names where `device_name` came from, for the error when it cannot be used.
    `cuda_sync='block'` calls `block_on_cuda_sync` first, when the run will use a GPU."""
    if cuda_sync == "block" and device_name != "cpu" and torch.cuda.is_available():
        block_on_cuda_sync()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, key)
    owner = world > 1 and not dist.is_initialized()
    if owner:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank, world, local_rank, device, owner)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a new tensor); what stateful policies apply to their statistics."""
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_objects(ctx: DistContext, obj: object) -> list:
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_pairs(
    features: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (features [N_r,D], labels [N_r]) concatenated in rank order; N_r may
    differ between processes (feature memory banks under DDP)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (features.cpu(), labels.cpu()))
    return torch.cat([f for f, _ in parts]), torch.cat([lab for _, lab in parts])


def broadcast_object(ctx: DistContext, obj: object) -> object:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(ctx: DistContext) -> None:
    """End the process group if `ctx` created it."""
    if ctx.owner and dist.is_initialized():
        dist.destroy_process_group()
