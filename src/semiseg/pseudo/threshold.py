"""The stateless weighting functions DAW (Table 1) compares against: constant, step, power.

Each maps the max confidence p of a teacher prediction to a loss weight f(p) (DAW Eq. 2);
the target is always the argmax class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from semiseg.pseudo.base import Policy, PolicyOptions


@dataclass
class PseudoLabelOptions(PolicyOptions):
    name: str = "pseudo_label"


@dataclass
class ThresholdOptions(PolicyOptions):
    name: str = "threshold"
    threshold: float = 0.95
    """Confidence a pixel needs to teach (FixMatch/UniMatch: 0.95)."""

    def validate(self) -> None:
        super().validate()
        self.probability("threshold")


@dataclass
class PowerOptions(PolicyOptions):
    name: str = "ael"
    power: float = 2.0
    """Exponent of the weight conf ** power."""

    def validate(self) -> None:
        super().validate()
        self.require(
            math.isfinite(self.power) and self.power >= 0, "power", "must be a finite number >= 0"
        )


class ConstantPolicy(Policy):
    """Pseudo-Label (Lee, 2013): f(p) = 1, every valid pixel teaches with its argmax class."""

    name = "pseudo_label"
    Options = PseudoLabelOptions
    summary = "1 on every valid pixel (Pseudo-Label)"

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        confidence, target = probs.max(dim=1)
        return confidence, target, torch.ones_like(confidence)


class ThresholdPolicy(Policy):
    """FixMatch (Sohn et al., 2020) / UniMatch: f(p) = 1[p >= threshold], exactly 0 or 1."""

    name = "threshold"
    Options = ThresholdOptions
    summary = "1 if confidence >= `threshold` (FixMatch, UniMatch)"

    def __init__(
        self,
        num_classes: int,
        threshold: float = 0.95,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__(num_classes, reduce)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        confidence, target = probs.max(dim=1)
        return confidence, target, (confidence >= self.threshold).float()


class PowerPolicy(Policy):
    """AEL-style soft weight (Hu et al., 2021): f(p) = p ** power.

    With `normalize` (default) the weights are divided by their mean over the valid pixels
    of the batch, so the average weight is 1 and the weighting only redistributes the
    unlabeled loss among pixels instead of also shrinking it: this is the "normalised
    teacher confidence squared" of the AEL setting the FPL paper builds on (power = 2).
    The mean is over the batch this process sees; it is not reduced across processes.
    """

    name = "ael"
    Options = PowerOptions
    summary = "confidence ** `power`, normalised to mean 1 (AEL)"

    def __init__(
        self,
        num_classes: int,
        power: float = 2.0,
        normalize: bool = True,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__(num_classes, reduce)
        if not (math.isfinite(power) and power >= 0.0):
            raise ValueError(f"power must be a finite number >= 0, got {power}")
        self.power = float(power)
        self.normalize = normalize

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        confidence, target = probs.max(dim=1)
        weight = confidence.pow(self.power)
        if self.normalize:
            # p >= 1/C > 0, so the mean is positive whenever a pixel is valid; with none valid
            # every weight is masked to 0 afterwards anyway.
            weight = weight / ((weight * valid).sum() / valid.sum().clamp(min=1))
        return confidence, target, weight
