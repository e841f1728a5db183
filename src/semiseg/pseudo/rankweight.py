"""Rank-statistics pseudo-label weights (ECCV 2024, "Weighting pseudo-labels via rank statistics").

A pseudo-labeled pixel of class c is trusted as much as its feature "looks like" class c's
prototype, measured not by feature values but by which dimensions are largest: the
overlap s of the top-k feature indices of the pixel and of the prototype (Sec. 3.4). The
weight is W = s / k (paper) or 1 + s / k (released code), and multiplies the confidence-
thresholded cross-entropy (Eq. 5-6). Prototypes are means of per-class memory banks of
labeled and reliable unlabeled pixel features (`semiseg.pseudo.memory.FeatureBank`).

Shapes: features [B,D,H,W], prototypes [C,D], pseudo labels [B,H,W] (255 = none).
Features are ranked by value; the penultimate features the paper uses follow a ReLU, so
value and magnitude agree. Equal values are ranked by dimension index (as a stable sort
would), so the weight is deterministic under ties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.pseudo.base import Policy, PolicyContext, PolicyOptions, PseudoLabels
from semiseg.pseudo.detector import DetectorOptions
from semiseg.pseudo.memory import FeatureBank, Gather, combined_prototypes
from semiseg.pseudo.threshold import PowerPolicy, ThresholdPolicy

Variant = Literal["paper", "official"]


def top_k_mask(values: Tensor, k: int, dim: int) -> Tensor:
    """bool, the shape of `values`: True at the k largest entries along `dim`, ties at the
    k-th value broken towards the lower index (the order a stable descending sort gives).

    One `torch.topk` finds the k-th value; entries above it are in, and of those equal to it
    the first ones by index fill the remaining places. A stable sort of every pixel's D
    values gives the same set at several times the cost.
    """
    if not 1 <= k <= values.shape[dim]:
        raise ValueError(f"k must be in [1, {values.shape[dim]}], got {k}")
    kth = values.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    above = values > kth
    tied = values == kth
    free = k - above.sum(dim=dim, keepdim=True)
    # Ordering the ties costs a cumsum; only needed where more entries tie than places remain.
    if bool((tied.sum(dim=dim, keepdim=True) > free).any()):
        tied &= tied.cumsum(dim=dim) <= free
    return above | tied


def rank_overlap(features: Tensor, prototypes: Tensor, k: int = 5) -> Tensor:
    """s for every pixel and every class: #(top-k of the pixel's feature intersect top-k of
    prototype c), int64 [B,C,H,W]. Computed at the features' resolution, as one product of
    the pixels' and the prototypes' top-k membership masks."""
    if features.dim() != 4 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"features [B,D,H,W] and prototypes [C,D] must share D, got {tuple(features.shape)} and {tuple(prototypes.shape)}"
        )
    # float32 whatever the features' dtype (AMP): the counts, at most k, stay exact.
    members = top_k_mask(prototypes, k, dim=1).float()
    pixels = top_k_mask(features, k, dim=1).float()
    return torch.einsum("bdhw,cd->bchw", pixels, members).round().long()


def _weights_from_overlap(s: Tensor, k: int, variant: Variant) -> Tensor:
    if variant == "paper":
        return s.float() / k
    if variant == "official":
        return 1.0 + s.float() / k
    raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")


def rank_weight(
    features: Tensor,
    prototypes: Tensor,
    pseudo_label: Tensor,
    k: int = 5,
    prototype_valid: Tensor | None = None,
    variant: Variant = "paper",
) -> Tensor:
    """Per-pixel weight of Eq. 6 from rank statistics, [B,H,W] float.

    Args:
        features: [B,D,h,w] pixel features at the pseudo labels' resolution or below it (the
            decoder's stride): then the per-class overlaps are computed per feature cell and
            taken nearest-neighbour at each label pixel, which equals rank_weight on
            nearest-upsampled features without materialising them (the released code
            upsamples the features bilinearly).
        prototypes: [C,D] class prototypes.
        pseudo_label: [B,H,W] int64 pseudo classes (255: no pseudo label, weight 0).
        k: top-k size (the paper's 5).
        prototype_valid: [C] bool, False for classes without a prototype yet (their pixels
            get weight 1 in both variants); None means all valid.
        variant: 'paper' W = s/k in [0, 1]; 'official' W = 1 + s/k in [1, 2].
    """
    s = rank_overlap(features, prototypes, k)
    if s.shape[-2:] != pseudo_label.shape[-2:]:
        s = F.interpolate(s.float(), size=pseudo_label.shape[-2:], mode="nearest").long()
    return _pick(s, pseudo_label, k, prototype_valid, variant)


def _pick(
    s: Tensor, pseudo_label: Tensor, k: int, prototype_valid: Tensor | None, variant: Variant
) -> Tensor:
    """The weight of each pixel's own pseudo class from the overlap table s [B,C,H,W]."""
    label = pseudo_label.clamp(max=s.shape[1] - 1)
    weight = _weights_from_overlap(s.gather(1, label.unsqueeze(1)).squeeze(1), k, variant)
    return _finish(weight, pseudo_label, prototype_valid)


def _finish(weight: Tensor, pseudo_label: Tensor, prototype_valid: Tensor | None) -> Tensor:
    """1 where the pseudo class has no prototype yet, 0 where there is no pseudo label."""
    if prototype_valid is not None:
        label = pseudo_label.clamp(max=prototype_valid.shape[0] - 1)
        weight = torch.where(prototype_valid[label], weight, torch.ones_like(weight))
    return weight.masked_fill(pseudo_label == IGNORE_INDEX, 0.0)


def cosine_table(features: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every pixel feature with every prototype, clamped to [0, 1],
    [B,C,H,W] (the paper's comparison, Fig. 6)."""
    f = F.normalize(features.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=1)
    return torch.einsum("bdhw,cd->bchw", f, p).clamp(min=0.0)


def cosine_weight(
    features: Tensor,
    prototypes: Tensor,
    pseudo_label: Tensor,
    prototype_valid: Tensor | None = None,
) -> Tensor:
    """Cosine-similarity weight of each pixel's pseudo class, [B,H,W] (conventions of
    `rank_weight`: 1 without a prototype, 0 without a pseudo label)."""
    table = cosine_table(features, prototypes)
    label = pseudo_label.clamp(max=prototypes.shape[0] - 1)
    return _finish(table.gather(1, label.unsqueeze(1)).squeeze(1), pseudo_label, prototype_valid)


def _to_grid(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resampling of [B,H,W] maps (labels, masks, confidences) to `size`."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0].to(maps.dtype)


def _pixels(features: Tensor, keep: Tensor) -> Tensor:
    """The feature vectors [N,D] of the pixels where `keep` [B,h,w] is True."""
    return features.permute(0, 2, 3, 1)[keep]


@dataclass
class RankWeightOptions(PolicyOptions):
    name: str = "rankweight"
    threshold: float = 0.95
    """Confidence threshold of the base weight 1[p >= threshold] (FixMatch/UniMatch: 0.95)."""
    k: int = 5
    """Size of the top-k index sets compared (the paper's 5)."""
    bank_size: int = 256
    """Features kept per class in each memory bank (psi)."""
    per_update: int | None = 8
    """At most this many random features per class enter a bank per step (the released code
    adds at most a batch's worth, 8 on VOC, so a bank of 256 spans 32 steps); None: up to
    bank_size, so a frequent class's bank is refilled from every batch."""
    similarity: Literal["rank", "cosine"] = "rank"
    """Rank statistics (the method) or cosine similarity (its Fig. 6 comparison)."""
    variant: Variant = "paper"
    """'paper': W = s/k; 'official': the released code's 1 + s/k and labeled bank rule."""
    rppi: bool = True
    """Prototypes also from detector-verified reliable unlabeled pixels (RPPI); off = PPW alone."""
    reliable_threshold: float = 0.95
    """Teacher confidence a detector-verified pixel needs to be reliable."""
    base: Literal["threshold", "ael"] = "threshold"
    """The weight it multiplies: 1[conf >= threshold], or AEL's power weight."""
    power: float = 2.0
    """Exponent of the AEL base weight (`base: ael`)."""
    detector: DetectorOptions = field(default_factory=DetectorOptions)
    """The detector whose cached boxes verify reliable pixels (`semiseg detector`, RPPI)."""

    def validate(self) -> None:
        super().validate()
        self.probability("threshold", "reliable_threshold")
        self.positive("k", "bank_size")
        self.require(
            self.per_update is None or self.per_update > 0, "per_update", "must be positive or null"
        )
        self.require(
            not self.rppi or bool(self.detector.classes),
            "rppi",
            "needs the detector's classes (policy.detector.classes); set policy.rppi=false for PPW alone",
        )

    def detections(self) -> tuple[str, list[int]] | None:
        if not self.rppi:
            return None
        return self.detector.dir, list(self.detector.classes)


class RankWeighting(Policy):
    """Pseudo-label pixel weighting by rank statistics (PPW), optionally with detector-verified
    reliable pixels in the prototypes (RPPI): the paper's Eq. 5-6 as a policy.

    weight = base(confidence) x W, with base the confidence threshold 1[p >= tau] (FixMatch,
    UniMatch; `base="ael"`: AEL's normalised power weight) and W = `rank_weight` of the
    pixel's feature against its pseudo class's prototype (`similarity="cosine"` for the
    paper's Fig. 6 comparison). Prototypes are the mean of a labeled FIFO bank (`update`
    pushes a random subset of each labeled class's pixel features) and, with `rppi`, of an
    unlabeled bank fed with reliable pixels: inside a detected box of their pseudo class
    (`detections`, a bitmask per pixel: bit i = inside a box of `detector_classes[i]`) with
    confidence >= `reliable_threshold`. Classes without a labeled feature yet get W = 1.

    Choices where the paper is silent: features are the ones the weights are computed from
    (the weak view's, at decoder resolution; labels and masks are taken nearest-neighbour on
    that grid), and at most `per_update` random features per class and step enter a bank (8,
    the released code's VOC batch size; None: up to a bank's worth).
    `variant="official"` is the released code: W = 1 + s/k; only correctly predicted labeled
    pixels with confidence > 0.95 enter the labeled bank; each view's loss is divided by
    sum(W x valid) instead of its number of valid pixels (the `normaliser` its pseudo labels
    carry); and the reliable pixels of the unlabeled bank are the student's strong-view
    features (`learn_from_student`), not the teacher's weak-view ones.
    """

    name = "rankweight"
    Options = RankWeightOptions
    summary = "the threshold's 0/1 times the top-k rank overlap of the pixel's feature with its class prototype; with RPPI, detector-verified pixels join the prototypes"
    stateful = True
    needs_features = True

    @classmethod
    def from_options(
        cls, options: RankWeightOptions, num_classes: int, context: PolicyContext | None = None
    ) -> RankWeighting:
        context = context or PolicyContext()
        arguments = options.arguments()
        detector = arguments.pop("detector")
        return cls(
            num_classes,
            detector_classes=detector.classes,
            reduce=context.reduce,
            gather=context.gather,
            seed=context.seed,
            **arguments,
        )

    @property
    def needs_detections(self) -> bool:
        return self.rppi

    def __init__(
        self,
        num_classes: int,
        threshold: float = 0.95,
        k: int = 5,
        bank_size: int = 256,
        per_update: int | None = 8,
        similarity: Literal["rank", "cosine"] = "rank",
        variant: Variant = "paper",
        rppi: bool = True,
        reliable_threshold: float = 0.95,
        base: Literal["threshold", "ael"] = "threshold",
        power: float = 2.0,
        detector_classes: tuple[int, ...] | list[int] = (),
        reduce: Callable[[Tensor], Tensor] | None = None,
        gather: Gather | None = None,
        seed: int = 0,
    ):
        super().__init__(num_classes, reduce)
        if similarity not in ("rank", "cosine"):
            raise ValueError(f"similarity must be 'rank' or 'cosine', got {similarity!r}")
        if variant not in ("paper", "official"):
            raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
        if rppi and not detector_classes:
            raise ValueError(
                "RPPI needs the detector's classes (policy.detector.classes); or set rppi off (PPW alone)"
            )
        self.base: Policy = (
            ThresholdPolicy(num_classes, threshold)
            if base == "threshold"
            else PowerPolicy(num_classes, power)
        )
        self.k, self.bank_size, self.per_update = k, bank_size, per_update
        self.similarity, self.variant, self.rppi = similarity, variant, rppi
        self.reliable_threshold = reliable_threshold
        self.detector_bit = torch.full((num_classes,), -1, dtype=torch.int64)
        for bit, c in enumerate(detector_classes):
            self.detector_bit[c] = bit
        self.gather, self.seed = gather, seed
        self.labeled_bank: FeatureBank | None = None
        self.unlabeled_bank: FeatureBank | None = None
        self._logs: dict[str, float] = {}
        self._last_extra: dict[str, Tensor] = {}

    def _banks(self, dim: int) -> tuple[FeatureBank, FeatureBank]:
        if self.labeled_bank is None or self.unlabeled_bank is None:
            options = {"size": self.bank_size, "per_update": self.per_update, "gather": self.gather}
            self.labeled_bank = FeatureBank(self.num_classes, dim, seed=self.seed, **options)
            self.unlabeled_bank = FeatureBank(self.num_classes, dim, seed=self.seed + 1, **options)
        return self.labeled_bank, self.unlabeled_bank

    @torch.no_grad()
    def update(self, probs: Tensor, labels: Tensor, features: Tensor | None = None) -> None:
        """Push labeled pixel features [B,D,h,w] with their labels [B,H,W] into the labeled bank."""
        if features is None:
            raise ValueError("the rankweight policy needs the labeled pixels' features in update()")
        self._check_probs(probs)
        labeled, _ = self._banks(features.shape[1])
        size = tuple(features.shape[-2:])
        labels = _to_grid(labels, size)
        keep = labels != IGNORE_INDEX
        if self.variant == "official":
            confidence, pred = probs.max(dim=1)
            keep &= (_to_grid(pred, size) == labels) & (_to_grid(confidence, size) > 0.95)
        labeled.push(_pixels(features, keep), labels[keep])

    def _select_with(
        self, probs: Tensor, valid: Tensor, features: Tensor | None, detections: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if features is None:
            raise ValueError("the rankweight policy needs the teacher's features")
        confidence, target, base_weight = self.base._select(probs, valid)
        labeled, unlabeled = self._banks(features.shape[1])
        if self.rppi:
            prototypes, prototype_valid = combined_prototypes(labeled, unlabeled)
        else:
            prototypes, prototype_valid = labeled.prototypes()
        prototypes, prototype_valid = (
            prototypes.to(features.device),
            prototype_valid.to(features.device),
        )
        label = target.masked_fill(~valid, IGNORE_INDEX)
        if self.similarity == "rank":
            w = rank_weight(features, prototypes, label, self.k, prototype_valid, self.variant)
        else:
            table = F.interpolate(
                cosine_table(features, prototypes), size=label.shape[-2:], mode="nearest"
            )
            w = _finish(table.gather(1, target.unsqueeze(1)).squeeze(1), label, prototype_valid)
        used = valid & (base_weight > 0)
        self._logs = {
            "mean_rank_weight": float(w[used].mean()) if bool(used.any()) else float("nan"),
            "prototypes": float(prototype_valid.sum()),
        }
        official = self.variant == "official"
        # The released code divides each view's loss by sum(W x valid) instead of #valid.
        self._last_extra = {"normaliser": w} if official else {}
        if self.rppi:
            if detections is None:
                raise ValueError(
                    "RPPI needs detector boxes for the unlabeled images (run `semiseg detector detect`)"
                )
            reliable = (
                valid
                & self.inside_box(target, detections)
                & (confidence >= self.reliable_threshold)
            )
            if official:
                # The released code fills its bank from the student's strong views instead.
                self._last_extra["detections"] = detections
            else:
                self._push_reliable(features, target, reliable)
            self._logs["reliable_fraction"] = float(reliable.sum() / valid.sum().clamp(min=1))
        return confidence, target, base_weight * w

    def _push_reliable(self, features: Tensor, target: Tensor, reliable: Tensor) -> None:
        _, unlabeled = self._banks(features.shape[1])
        size = tuple(features.shape[-2:])
        on_grid = _to_grid(reliable, size)
        unlabeled.push(_pixels(features, on_grid), _to_grid(target, size)[on_grid])

    def _extra(self, valid: Tensor, detections: Tensor | None) -> dict[str, Tensor]:
        return dict(self._last_extra)

    def learn_from_student(self, features: Tensor, pl: PseudoLabels, valid: Tensor) -> None:
        """`variant="official"` with RPPI: the reliable pixels of a student's (pasted) strong
        view enter the unlabeled bank, with their pseudo labels: inside a detected box of
        their class, teacher confidence >= reliable_threshold (the released code: 0.95)."""
        if not (self.rppi and self.variant == "official") or "detections" not in pl.extra:
            return
        reliable = valid & self.inside_box(
            pl.target.clamp(max=self.num_classes - 1), pl.extra["detections"]
        )
        reliable &= (pl.confidence >= self.reliable_threshold) & (pl.target != IGNORE_INDEX)
        self._push_reliable(features, pl.target, reliable)

    def inside_box(self, target: Tensor, detections: Tensor) -> Tensor:
        """bool [B,H,W]: the pixel lies in a detected box of its pseudo class (RPPI criterion 1)."""
        bit = self.detector_bit.to(target.device)[target]
        return (bit >= 0) & ((detections >> bit.clamp(min=0)) & 1).bool()

    def diagnostics(self) -> dict[str, float]:
        logs = dict(self._logs)
        if self.labeled_bank is not None and self.unlabeled_bank is not None:
            logs["labeled_bank_fill"] = float(self.labeled_bank.counts.sum()) / (
                self.num_classes * self.bank_size
            )
            logs["unlabeled_bank_fill"] = float(self.unlabeled_bank.counts.sum()) / (
                self.num_classes * self.bank_size
            )
        return logs

    def state_dict(self) -> dict:
        banks = None
        if self.labeled_bank is not None and self.unlabeled_bank is not None:
            banks = {
                "labeled": self.labeled_bank.state_dict(),
                "unlabeled": self.unlabeled_bank.state_dict(),
            }
        return {**super().state_dict(), "banks": banks}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("banks",))
        if state["banks"] is not None:
            labeled, unlabeled = self._banks(state["banks"]["labeled"]["queues"].shape[-1])
            labeled.load_state_dict(state["banks"]["labeled"])
            unlabeled.load_state_dict(state["banks"]["unlabeled"])
