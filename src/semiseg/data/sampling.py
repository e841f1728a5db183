"""Samplers whose order is a pure function of (seed, position), so a resumed run sees the same data.

A training run is a count of iterations, not of epochs: the labeled (and later the
unlabeled) stream is an endless sequence of seeded shuffled epochs. Knowing how many
samples a process has consumed is enough to restart the stream exactly, with no
sampler state in the checkpoint. Each yielded item carries a seed for the sample's
random augmentation, so augmentations are reproduced too (see SegmentationDataset).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


def _mix(*values: int) -> int:
    """A cheap, well-spread 63-bit hash of integers (splitmix-style), stable across Python runs."""
    h = 0
    for v in values:
        h = (h ^ (v & _MASK63)) * _SEED_MIX & _MASK63
        h ^= h >> 31
    return h


class ResumableSampler(Sampler):
    """Endless shuffled epochs over `size` samples, sharded over `world` processes.

    Yields `(index, augmentation_seed)`. Epoch e is `randperm(size)` drawn from a generator
    seeded with (seed, e), padded by wrapping to a multiple of `world` (as DistributedSampler
    does), and process `rank` takes every world-th element. `start` is the number of samples
    this process has already consumed, so `start = iterations_done * batch_size` resumes.
    `salt` changes the augmentation seeds but not the order: two samplers that differ only
    in it give the same images, augmented differently.
    """

    def __init__(
        self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0, salt: int = 0
    ):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start
        self.salt = salt
        self.per_rank = -(-size // world)

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = order + order[: self.per_rank * self.world - self.size]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.start
        while True:
            epoch, position = divmod(n, self.per_rank)
            indices = self.epoch_indices(epoch)
            for pos in range(position, self.per_rank):
                key = (1,) if self.salt == 0 else (1, self.salt)
                yield indices[pos], _mix(self.seed, epoch, pos, self.rank, *key)
                n += 1

    def __len__(self) -> int:
        # Endless by design; DataLoader only needs a length for progress estimates.
        return 2**62


class ShardSampler(Sampler):
    """Every world-th index from `rank`, with no padding, so evaluation counts each sample once."""

    def __init__(self, size: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
