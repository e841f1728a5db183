"""Per-class FIFO memory banks of pixel features, and class prototypes from them.

The rank-statistics weighting (supplement Sec. 5) keeps, for each class, the most recent
`size` (psi = 256) features of labeled pixels and of reliable unlabeled pixels; each update
adds a random subset of the step's pixels of that class (at most `per_update`), newest
first, and drops the oldest beyond `size`. A class prototype is the mean of its stored
features. Under DDP every process contributes its samples (`gather`), so all processes hold
the same bank.

A class with more new pixels than a push may add always gets a uniformly random subset
("random sampling ... leads to a more diverse set of features per class", supplement Sec. 5):
pixels arrive in raster order, so keeping the last ones would fill the bank from the bottom
rows of the last image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Gather = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class FeatureBank:
    """FIFO queues of D-dim features per class.

    Args:
        num_classes: C. dim: D. size: features kept per class (psi).
        per_update: at most this many random features of each class are added per `push`
            (per process); None: up to `size` (a bank's worth) of them.
        gather: (features, labels) of this process -> those of every process, concatenated
            in rank order (the trainer passes an all-gather under DDP); None: single process.
        seed: seed of the bank's own random generator (saved in `state_dict`).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        size: int = 256,
        per_update: int | None = None,
        gather: Gather | None = None,
        seed: int = 0,
    ):
        if size < 1:
            raise ValueError(f"bank size must be positive, got {size}")
        self.num_classes, self.dim, self.size, self.per_update = num_classes, dim, size, per_update
        self.gather = gather
        self.queues = torch.zeros(num_classes, size, dim)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Add features [N,D] of pixels of classes `labels` [N] (255 and out-of-range ignored)."""
        if (
            features.dim() != 2
            or features.shape[1] != self.dim
            or labels.shape != features.shape[:1]
        ):
            raise ValueError(
                f"push takes features [N,{self.dim}] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        features, labels = features.detach().float().cpu(), labels.cpu().long()
        keep = (labels >= 0) & (labels < self.num_classes)
        features, labels = features[keep], labels[keep]
        limit = self.size if self.per_update is None else min(self.per_update, self.size)
        chosen = []
        for c in labels.unique().tolist():
            where = torch.nonzero(labels == c).flatten()
            if where.numel() > limit:
                where = where[torch.randperm(where.numel(), generator=self.generator)[:limit]]
            chosen.append(where)
        index = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
        features, labels = features[index], labels[index]
        if self.gather is not None:
            features, labels = self.gather(features, labels)
        for c in labels.unique().tolist():
            new = features[labels == c].flip(0)  # newest first
            merged = torch.cat([new, self.queues[c, : self.counts[c]]])[: self.size]
            self.queues[c, : merged.shape[0]] = merged
            self.counts[c] = merged.shape[0]

    def features(self, c: int) -> Tensor:
        """The stored features of class c, newest first, [n_c, D]."""
        return self.queues[c, : self.counts[c]]

    def sums(self) -> tuple[Tensor, Tensor]:
        """Per-class sums [C,D] and counts [C] of the stored features."""
        return self.queues.sum(dim=1), self.counts.clone()

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """(prototypes [C,D], valid [C]): the mean stored feature of each class; valid is
        False (and the prototype 0) for empty classes."""
        total, count = self.sums()
        valid = count > 0
        return total / count.clamp(min=1).unsqueeze(1), valid

    def state_dict(self) -> dict:
        return {
            "queues": self.queues.clone(),
            "counts": self.counts.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["queues"].shape) != tuple(self.queues.shape):
            raise ValueError(
                f"bank state of shape {tuple(state['queues'].shape)} given to a bank of {tuple(self.queues.shape)}"
            )
        self.queues.copy_(state["queues"])
        self.counts.copy_(state["counts"])
        self.generator.set_state(state["generator"])


def combined_prototypes(labeled: FeatureBank, unlabeled: FeatureBank) -> tuple[Tensor, Tensor]:
    """Prototypes from the labeled and the reliable-unlabeled banks together (the mean of all
    their vectors), valid only where the labeled bank has the class, as in the released code:
    a class is never represented by pseudo-labeled pixels alone."""
    total_l, count_l = labeled.sums()
    total_u, count_u = unlabeled.sums()
    count = count_l + count_u
    return (total_l + total_u) / count.clamp(min=1).unsqueeze(1), count_l > 0
