"""Pseudo-label policies: which unlabeled pixels teach the student, with what target and weight.

Plug-and-play components with no dependency on the trainer; see `semiseg.pseudo.base` for
the interface and a five-line usage example.
"""

from __future__ import annotations

from semiseg.pseudo.base import IGNORE_INDEX, Policy, PseudoLabels, mean_weight, used_fraction
from semiseg.pseudo.daw import DAWeighting, optimal_threshold, trade_off
from semiseg.pseudo.rankweight import RankWeighting
from semiseg.pseudo.threshold import ConstantPolicy, PowerPolicy, ThresholdPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (ConstantPolicy, ThresholdPolicy, PowerPolicy, DAWeighting, RankWeighting)
}


def build_policy(name: str, num_classes: int, **options) -> Policy:
    """The policy registered as `name` (see POLICIES), built with its keyword `options`
    (e.g. threshold=0.95, power=2.0, momentum=0.99, reduce=all_reduce_sum)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](num_classes, **options)


__all__ = [
    "IGNORE_INDEX",
    "POLICIES",
    "ConstantPolicy",
    "DAWeighting",
    "Policy",
    "PowerPolicy",
    "PseudoLabels",
    "RankWeighting",
    "ThresholdPolicy",
    "build_policy",
    "mean_weight",
    "optimal_threshold",
    "trade_off",
    "used_fraction",
]
