"""The pseudo-label policy interface: teacher probabilities in, targets and per-pixel weights out.

A policy answers one question for every unlabeled pixel: which class does the student learn
and with what weight. It is pure tensor code with no dependency on a trainer, so it can be
dropped into any training loop::

    policy = DAWeighting(num_classes=21)
    policy.update(labeled_probs, labels)          # statistics from labeled predictions
    pl = policy(unlabeled_probs, valid)           # PseudoLabels(target, weight, confidence)
    loss = (F.cross_entropy(student_logits, pl.target, ignore_index=255, reduction="none")
            * pl.weight).sum() / valid.sum()

Shapes: class maps `[B, C, H, W]`, pixel maps `[B, H, W]`, ignore index 255.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

IGNORE_INDEX = 255


@dataclass
class PseudoLabels:
    """What a policy returns for a batch of unlabeled pixels.

    target: [B,H,W] int64, the argmax of the (possibly aligned) probabilities; 255 where the
        pixel is not valid.
    weight: [B,H,W] float32 loss weight; 0 means unused. Step policies give exactly 0 or 1.
    confidence: [B,H,W] float32, the max probability the decision was taken on (kept on
        invalid pixels too; mask it with the valid map before averaging).
    positive: [B,C,H,W] bool fuzzy positive sets (FPL) when the unlabeled loss learns from a
        set of classes per pixel instead of `target`; None for ordinary cross-entropy.
    """

    target: Tensor
    weight: Tensor
    confidence: Tensor
    positive: Tensor | None = None


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class Policy:
    """Turns teacher probabilities on unlabeled pixels into targets and weights.

    `reduce` sums a tensor over processes (the trainer passes an all-reduce under DDP).
    Policies that keep statistics apply it to sufficient statistics (counts, sums, sums of
    squares), never to means, so that every process holds identical state; under DDP every
    process must therefore call `update` and `__call__` in lockstep. Default: identity.

    Subclasses set `name` and implement `_select`; stateful ones also override `update`,
    `diagnostics`, `state_dict` and `load_state_dict`.
    """

    name: ClassVar[str]

    def __init__(self, num_classes: int, reduce: Callable[[Tensor], Tensor] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reduce: Callable[[Tensor], Tensor] = reduce if reduce is not None else _identity

    needs_features: ClassVar[bool] = False
    """The policy also takes pixel features (and detections) in `update` and `__call__`."""

    @torch.no_grad()
    def __call__(
        self,
        probs: Tensor,
        valid: Tensor | None = None,
        features: Tensor | None = None,
        detections: Tensor | None = None,
    ) -> PseudoLabels:
        """Pseudo labels for softmax probabilities `probs` [B,C,H,W] of the teacher.

        `valid` [B,H,W] bool is False on padding or ignored pixels: they get weight 0 and
        target 255 and never enter a policy's statistics. None means every pixel is valid.
        `features` [B,D,h,w] (the teacher's penultimate features) and `detections` [B,H,W]
        (detector box bitmasks) are for policies with `needs_features`; others ignore them.
        """
        valid = self._valid_mask(probs, valid)
        if self.needs_features:
            confidence, target, weight = self._select_with(
                probs.float(), valid, features, detections
            )
        else:
            confidence, target, weight = self._select(probs.float(), valid)
        return PseudoLabels(
            target=target.masked_fill(~valid, IGNORE_INDEX),
            weight=weight.float().masked_fill(~valid, 0.0),
            confidence=confidence.float(),
        )

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(confidence, target, weight), each [B,H,W], for float32 `probs` [B,C,H,W].

        Values on invalid pixels are overwritten by `__call__`; `valid` is passed for policies
        whose weights or statistics depend on the other pixels of the batch.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement _select")

    def _select_with(
        self, probs: Tensor, valid: Tensor, features: Tensor | None, detections: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`_select` for policies with `needs_features`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _select_with")

    def update(self, probs: Tensor, labels: Tensor, features: Tensor | None = None) -> None:
        """Statistics from labeled predictions: probs [B,C,H,W], labels [B,H,W] (255 ignored),
        and for policies with `needs_features` the features [B,D,h,w] of those pixels.

        Stateless policies ignore it.
        """

    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging (thresholds, fitted parameters); empty for stateless policies."""
        return {}

    def state_dict(self) -> dict:
        return {"policy": self.name, "num_classes": self.num_classes}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ())

    def _check_state(self, state: dict, keys: tuple[str, ...]) -> None:
        """Raise ValueError unless `state` is this policy's state_dict with exactly `keys` added."""
        expected = {"policy", "num_classes", *keys}
        if set(state) != expected:
            raise ValueError(
                f"{self.name} state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        if state["policy"] != self.name:
            raise ValueError(f"state of policy {state['policy']!r} given to policy {self.name!r}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(
                f"state for {state['num_classes']} classes given to a policy for {self.num_classes}"
            )

    def _check_probs(self, probs: Tensor) -> None:
        if probs.dim() != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be [B,{self.num_classes},H,W], got {tuple(probs.shape)}")

    def _valid_mask(self, probs: Tensor, valid: Tensor | None) -> Tensor:
        self._check_probs(probs)
        pixels = (probs.shape[0], *probs.shape[2:])
        if valid is None:
            return torch.ones(pixels, dtype=torch.bool, device=probs.device)
        if valid.dtype != torch.bool or tuple(valid.shape) != pixels:
            raise ValueError(
                f"valid must be a bool tensor of shape {pixels}, got {valid.dtype} {tuple(valid.shape)}"
            )
        return valid


def _pixels(pl: PseudoLabels, valid: Tensor | None) -> Tensor:
    # Invalid pixels carry target 255, so the target map recovers the valid map when none is given.
    return pl.target != IGNORE_INDEX if valid is None else valid


def used_fraction(pl: PseudoLabels, valid: Tensor | None = None) -> float:
    """Fraction of valid pixels with a positive weight (0.0 when no pixel is valid).

    `valid` [B,H,W] bool defaults to the pixels whose target is not 255.
    """
    mask = _pixels(pl, valid)
    used = (pl.weight > 0) & mask
    return float(used.sum() / mask.sum().clamp(min=1))


def mean_weight(pl: PseudoLabels, valid: Tensor | None = None) -> float:
    """Mean weight over valid pixels (0.0 when no pixel is valid); `valid` as in `used_fraction`."""
    mask = _pixels(pl, valid)
    return float((pl.weight * mask).sum() / mask.sum().clamp(min=1))
