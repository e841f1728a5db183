"""Losses of the schemes. Shapes: logits [B,C,H,W], targets [B,H,W] with ignore 255.

The labeled loss is a component of its own (`labeled_loss:` config section, `LABELED_LOSSES`):
`ce` (`cross_entropy`) or `ohem` (`ohem_cross_entropy`); the unlabeled losses are components in
`semiseg.pseudo` (`weighted_cross_entropy` there, and FPL's `fuzzy_positive_loss` (Eq. 7)
with the rest of FPL in `semiseg.pseudo.fpl`), re-exported here so that every loss function
has one import path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.options import ComponentOptions
from semiseg.pseudo.fpl import fuzzy_positive_loss
from semiseg.pseudo.unlabeled_loss import weighted_cross_entropy
from semiseg.registry import Registry

__all__ = [
    "LABELED_LOSSES",
    "cross_entropy",
    "fuzzy_positive_loss",
    "ohem_cross_entropy",
    "weighted_cross_entropy",
]


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    F.cross_entropy returns NaN for an all-ignore batch, which a random crop of a
    mostly-void image can produce; a NaN would poison the weights.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    threshold: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Online hard example mining: the mean cross-entropy over the hard labeled pixels.

    A valid pixel is kept when its predicted probability of its true class is at most
    max(threshold, p_k), p_k the `min_kept`-th smallest such probability of the batch, so at
    least `min_kept` pixels (of the whole batch) are kept, and every pixel whose true class
    is below `threshold`; with fewer than `min_kept` valid pixels all of them are kept. This
    is TorchSemiSeg's ProbOhemCrossEntropy2d, which UniMatch's and CPS's Cityscapes recipes
    use (threshold 0.7). 0 (with a graph) when no pixel is valid.
    """
    valid = target != ignore_index
    count = int(valid.sum())
    if count == 0:
        return logits.sum() * 0.0
    z = logits.float()
    if count > min_kept:
        with torch.no_grad():
            probs = (
                z.softmax(dim=1).gather(1, target.clamp(max=z.shape[1] - 1).unsqueeze(1)).squeeze(1)
            )
            cut = (
                max(threshold, float(torch.kthvalue(probs[valid], max(min_kept, 1)).values))
                if min_kept > 0
                else threshold
            )
            valid = valid & (probs <= cut)
    return F.cross_entropy(z, target.masked_fill(~valid, ignore_index), ignore_index=ignore_index)


@dataclass
class LabeledLossOptions(ComponentOptions):
    """The loss of labeled pixels (the `labeled_loss:` config section)."""

    name: str = "ce"


class LabeledLoss:
    """The loss every scheme applies to the labeled images' logits and masks."""

    name: ClassVar[str]
    Options: ClassVar[type[LabeledLossOptions]]
    summary: ClassVar[str] = ""

    def __init__(self, options: LabeledLossOptions | None = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Nothing to refuse: every scheme has labeled images."""

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class LabeledCrossEntropy(LabeledLoss):
    name = "ce"
    Options = LabeledLossOptions
    summary = "mean cross-entropy over the labeled pixels"

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target)


@dataclass
class OHEMOptions(LabeledLossOptions):
    name: str = "ohem"
    threshold: float = 0.7
    """A pixel whose true class has at most this probability is hard, and kept."""
    min_kept: int = 100_000
    """At least this many pixels per labeled image are kept (the hardest): UniMatch's
    Cityscapes recipe keeps 200,000 of each GPU's 2 images, CPS's 50,000 of each image."""

    def validate(self) -> None:
        super().validate()
        self.probability("threshold")
        self.require(self.min_kept >= 0, "min_kept", "must be >= 0")


class OHEMCrossEntropy(LabeledLoss):
    name = "ohem"
    Options = OHEMOptions
    summary = "OHEM cross-entropy: the pixels below `threshold` and at least `min_kept` per image (UniMatch's and CPS's Cityscapes recipes)"
    options: OHEMOptions

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        o = self.options
        return ohem_cross_entropy(logits, target, o.threshold, o.min_kept * logits.shape[0])


LABELED_LOSSES: Registry[type[LabeledLoss]] = Registry("labeled_loss", default="ce")
LABELED_LOSSES.add(LabeledCrossEntropy)
LABELED_LOSSES.add(OHEMCrossEntropy)
