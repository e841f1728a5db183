"""The unlabeled-loss interface: how a student learns from the pseudo labels of its teacher.

A loss object says what it needs from the teacher (`teach`: FPL adds each pixel's fuzzy
positive set and its adaptive weight), computes the student's loss on a view, and owns its
diagnostics and per-evaluation snapshots. Every semi-supervised scheme computes its
unlabeled terms through one, so any loss works under any scheme. Registering a subclass
(`semiseg.pseudo.LOSSES.add`) makes it a `loss.name`.

Shapes: logits [B,C,H,W], pixel maps [B,H,W], ignore index 255.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.options import ComponentOptions
from semiseg.pseudo.base import PseudoLabels


def weighted_cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor, valid: Tensor, denominator: Tensor | None = None
) -> Tensor:
    """sum(CE * weight) / #valid pixels: UniMatch's normalisation of the unlabeled loss
    (`denominator` replaces the count).

    logits [B,C,H,W]; target [B,H,W] (255 allowed where weight is 0); weight [B,H,W] float
    (0 = unused); valid [B,H,W] bool, the pixels that count in the denominator (not padding).
    Dividing by all valid pixels rather than by the used ones keeps a policy that discards
    most pixels from inflating the few it keeps.
    """
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    if denominator is None:
        denominator = valid.sum().clamp(min=1)
    return (per_pixel * weight).sum() / denominator


@dataclass
class LossOptions(ComponentOptions):
    """Options every unlabeled loss takes (the `loss:` config section)."""

    name: str = "ce"


class UnlabeledLoss:
    """Base class: the student's loss on one view against (pasted) pseudo labels.

    Subclasses set `name`, `Options`, `summary` and implement `__call__`; those that need
    more than the target from the teacher override `teach`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[LossOptions]]
    summary: ClassVar[str] = ""
    snapshot_dir: ClassVar[str | None] = None
    """Run-folder subfolder of `snapshot`'s arrays; None: the loss keeps no snapshots."""

    def __init__(self, options: LossOptions | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def from_options(cls, options: LossOptions) -> UnlabeledLoss:
        return cls(options)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, with a `ConfigError` that says why, a config this loss cannot serve."""

    def teach(self, probs: Tensor, pl: PseudoLabels) -> PseudoLabels:
        """Add what this loss needs of the teacher's probabilities `probs` [B,C,H,W] (before
        any alignment a policy applies) to the policy's pseudo labels of the same pixels."""
        return pl

    def __call__(self, logits: Tensor, pl: PseudoLabels, valid: Tensor) -> Tensor:
        """sum over pixels of (per-pixel loss x pl.weight) / #valid pixels of the view (or the
        sum of the policy's `normaliser` over them, see `Policy._extra`)."""
        raise NotImplementedError

    def combine(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """A step's unlabeled terms (this loss's values), before the scheme weights and adds
        them: a loss that rescales them together does it here. As they are by default."""
        return terms

    def diagnostics(self, pl: PseudoLabels, valid: Tensor) -> dict[str, Tensor | float]:
        """Scalars of the teaching signal worth logging each step."""
        return {}

    def oracle_diagnostics(
        self, logits: Tensor, pl: PseudoLabels, oracle: Tensor
    ) -> dict[str, Tensor | float]:
        """Scalars against ground truth `oracle` [B,H,W] that training never sees (255 where
        unknown), under `scheme.oracle_eval`."""
        return {}

    def snapshot(self, probs: Tensor) -> dict[str, np.ndarray] | None:
        """Arrays kept at each evaluation from the evaluated network's probabilities [N,C,H,W]
        on a few unlabeled images (saved under `snapshot_dir` with those images)."""
        return None


@dataclass
class CrossEntropyOptions(LossOptions):
    name: str = "ce"


class CrossEntropyLoss(UnlabeledLoss):
    """Cross-entropy with the policy's pseudo label, times its weight."""

    name = "ce"
    Options = CrossEntropyOptions
    summary = "cross-entropy with the policy's pseudo label"

    def __call__(self, logits: Tensor, pl: PseudoLabels, valid: Tensor) -> Tensor:
        return weighted_cross_entropy(
            logits, pl.target, pl.weight * valid, valid, denominator(pl, valid)
        )


def denominator(pl: PseudoLabels, valid: Tensor) -> Tensor | None:
    """What a view's summed loss is divided by instead of its number of valid pixels: the sum
    of the pseudo labels' `normaliser` over them (the released rank-weighting code's
    sum(W x valid)); None (the count) without one."""
    if "normaliser" not in pl.extra:
        return None
    return (pl.extra["normaliser"] * valid).sum().clamp(min=1e-12)
