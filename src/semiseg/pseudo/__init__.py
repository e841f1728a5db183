"""Pseudo-label policies and unlabeled losses: which unlabeled pixels teach the student, with
what target and weight, and how the student learns from them.

Plug-and-play components with no dependency on the trainer; see `semiseg.pseudo.base` (the
policy interface and a five-line usage example) and `semiseg.pseudo.unlabeled_loss`.
`POLICIES` and `LOSSES` map a config's `policy.name` / `loss.name` to the component; adding
one is its module plus one line here.
"""

from __future__ import annotations

from semiseg.labels import IGNORE_INDEX
from semiseg.pseudo.base import (
    Policy,
    PolicyContext,
    PolicyOptions,
    PseudoLabels,
    mean_weight,
    used_fraction,
)
from semiseg.pseudo.daw import DAWeighting, optimal_threshold, trade_off
from semiseg.pseudo.fpl import FuzzyPositiveLoss
from semiseg.pseudo.rankweight import RankWeighting
from semiseg.pseudo.threshold import ConstantPolicy, PowerPolicy, ThresholdPolicy
from semiseg.pseudo.unlabeled_loss import CrossEntropyLoss, LossOptions, UnlabeledLoss
from semiseg.registry import Registry

POLICIES: Registry[type[Policy]] = Registry("policy", default="threshold")
POLICIES.add(ConstantPolicy)
POLICIES.add(ThresholdPolicy)
POLICIES.add(PowerPolicy)
POLICIES.add(DAWeighting)
POLICIES.add(RankWeighting)

LOSSES: Registry[type[UnlabeledLoss]] = Registry("loss", default="ce")
LOSSES.add(CrossEntropyLoss)
LOSSES.add(FuzzyPositiveLoss)


def build_policy(name: str, num_classes: int, **options) -> Policy:
    """The policy registered as `name`, built with its keyword `options`
    (e.g. threshold=0.95, power=2.0, momentum=0.99, reduce=all_reduce_sum)."""
    return POLICIES.get(name)(num_classes, **options)


__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "POLICIES",
    "ConstantPolicy",
    "CrossEntropyLoss",
    "DAWeighting",
    "FuzzyPositiveLoss",
    "LossOptions",
    "Policy",
    "PolicyContext",
    "PolicyOptions",
    "PowerPolicy",
    "PseudoLabels",
    "RankWeighting",
    "ThresholdPolicy",
    "UnlabeledLoss",
    "build_policy",
    "mean_weight",
    "optimal_threshold",
    "trade_off",
    "used_fraction",
]
