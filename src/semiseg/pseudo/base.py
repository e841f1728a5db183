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

For the trainer, a policy class also carries its `Options` dataclass (the `policy:` config
section), a one-line `summary`, and `from_options`, which builds it from them; registering
it (`semiseg.pseudo.POLICIES.add`) makes it usable under every scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.options import ComponentOptions, ConfigError
from semiseg.pseudo.memory import Gather


def paste(base: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """CutMix: `source` inside `box` [B,h,w], `base` elsewhere; for [B,h,w] and [B,C,h,w] maps."""
    if base.dim() == 4:
        box = box[:, None]
    return torch.where(box, source, base)


@dataclass
class PseudoLabels:
    """What a policy returns for a batch of unlabeled pixels.

    target: [B,H,W] int64, the argmax of the (possibly aligned) probabilities; 255 where the
        pixel is not valid.
    weight: [B,H,W] float32 loss weight; 0 means unused. Step policies give exactly 0 or 1.
    confidence: [B,H,W] float32, the max probability the decision was taken on (kept on
        invalid pixels too; mask it with the valid map before averaging).
    extra: per-pixel teacher information an unlabeled loss asked for (`UnlabeledLoss.teach`),
        each a batch-first tensor [B,...,H,W] (FPL: 'positive', the fuzzy positive sets
        [B,C,H,W] bool); CutMix pastes and row slicing carry them along.
    """

    target: Tensor
    weight: Tensor
    confidence: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def rows(self, index: slice) -> PseudoLabels:
        """The pseudo labels of part of the batch."""
        return PseudoLabels(
            self.target[index],
            self.weight[index],
            self.confidence[index],
            {k: v[index] for k, v in self.extra.items()},
        )

    def pasted(self, source: PseudoLabels, box: Tensor) -> PseudoLabels:
        """CutMix of the pseudo labels: `source`'s inside `box` [B,h,w], these elsewhere."""
        return PseudoLabels(
            paste(self.target, source.target, box),
            paste(self.weight, source.weight, box),
            paste(self.confidence, source.confidence, box),
            {k: paste(v, source.extra[k], box) for k, v in self.extra.items() if k in source.extra},
        )

    def reweighted(self, weight: Tensor) -> PseudoLabels:
        return PseudoLabels(self.target, weight, self.confidence, self.extra)

    @staticmethod
    def cat(parts: list[PseudoLabels]) -> PseudoLabels:
        keys = set.intersection(*(set(p.extra) for p in parts))
        return PseudoLabels(
            torch.cat([p.target for p in parts]),
            torch.cat([p.weight for p in parts]),
            torch.cat([p.confidence for p in parts]),
            {k: torch.cat([p.extra[k] for p in parts]) for k in keys},
        )


@dataclass
class PolicyOptions(ComponentOptions):
    """Options every policy takes (the `policy:` config section)."""

    name: str = "threshold"
    warmup: int = 0
    """Labeled batches whose predictions (network in eval mode, nothing trained) feed a
    stateful policy's statistics before the first step of a fresh run. For short fine-tuning
    from a trained model, where DAW's EMA (m = 0.99) would otherwise be dominated by its
    initial fit for hundreds of steps; 0 is the papers' behaviour."""

    def validate(self) -> None:
        super().validate()
        self.require(self.warmup >= 0, "warmup", "must be >= 0")

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of the policy's constructor: its own options."""
        common = {f.name for f in fields(PolicyOptions)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in common}

    def detections(self) -> tuple[str, list[int]] | None:
        """(detector folder, detector classes in bit order) when the policy reads the cached
        detector boxes of the unlabeled images; None for policies that do not."""
        return None


@dataclass
class PolicyContext:
    """What a policy gets from the run it is part of: `reduce` sums a tensor over processes,
    `gather` concatenates every process's (features, labels) (both None in one process),
    `seed` seeds a policy's own random generators."""

    reduce: Callable[[Tensor], Tensor] | None = None
    gather: Gather | None = None
    seed: int = 0


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class Policy:
    """Turns teacher probabilities on unlabeled pixels into targets and weights.

    `reduce` sums a tensor over processes (the trainer passes an all-reduce under DDP).
    Policies that keep statistics apply it to sufficient statistics (counts, sums, sums of
    squares), never to means, so that every process holds identical state; under DDP every
    process must therefore call `update` and `__call__` in lockstep. Default: identity.

    Subclasses set `name`, `Options` and `summary` and implement `_select`; stateful ones
    (`stateful = True`) also override `update`, `diagnostics`, `state_dict` and
    `load_state_dict`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[PolicyOptions]]
    summary: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    """The policy keeps statistics of labeled predictions (`update`), so `policy.warmup` applies."""

    def __init__(self, num_classes: int, reduce: Callable[[Tensor], Tensor] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reduce: Callable[[Tensor], Tensor] = reduce if reduce is not None else _identity

    needs_features: ClassVar[bool] = False
    """The policy also takes pixel features (and detections) in `update` and `__call__`."""

    @property
    def needs_detections(self) -> bool:
        """`__call__` needs the detector box bitmasks of the unlabeled images."""
        return False

    @classmethod
    def from_options(
        cls, options: PolicyOptions, num_classes: int, context: PolicyContext | None = None
    ) -> Policy:
        """The policy of a config's `policy:` section, for a run with `context`."""
        context = context or PolicyContext()
        return cls(num_classes, reduce=context.reduce, **options.arguments())

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, with a `ConfigError` that says why, a config this policy cannot serve."""
        if cfg.policy.warmup and not cls.stateful:
            raise ConfigError(
                f"policy.warmup={cfg.policy.warmup}: the warm-up feeds a stateful policy's statistics, "
                f"and policy {cls.name!r} keeps none"
            )

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
            extra=self._extra(valid, detections),
        )

    def _extra(self, valid: Tensor, detections: Tensor | None) -> dict[str, Tensor]:
        """Per-pixel data of the last call that travels with its pseudo labels (pasted with
        them): a `normaliser` [B,H,W] whose sum over a view's valid pixels divides the
        unlabeled loss instead of their count, `detections` a policy needs on the student's
        view. None by default."""
        return {}

    def learn_from_student(self, features: Tensor, pl: PseudoLabels, valid: Tensor) -> None:
        """Statistics from the student's features [B,D,h,w] on a (pasted) view, with that
        view's pseudo labels and valid pixels [B,H,W]; most policies keep none."""

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
