"""Fuzzy Positive Learning (Qiao et al., CVPR 2023): fuzzy positive assignment and its diagnostics.

Instead of one pseudo label per pixel, FPL keeps the top-K classes of the teacher
prediction as a set of *fuzzy positive* labels (Alg. 1) and trains the student to rank all
of them above every other class (`semiseg.losses.fuzzy_positive_loss`, Eq. 7), weighted
per pixel by how sure the teacher is that the ground truth is in the set (Eq. 11).

Shapes: class maps `[B, C, H, W]`, pixel maps `[B, H, W]`, ignore index 255. Pure tensor
code: usable in any training loop::

    positive = fuzzy_positive_mask(teacher_probs, T=0.9)
    weight = adaptive_weight(teacher_probs, positive)
    loss = (fuzzy_positive_loss(student_logits, positive) * weight * valid).sum() / valid.sum()

`variant="official"` reproduces the released code (qpc1611094/FPL) where it differs from the
paper; see each function.

Everything FPL is in this module: the functions above, its diagnostics (the K histogram,
the positive gradient scores of Sec. 3.4) and `FuzzyPositiveLoss`, the `loss.name: fpl`
component every scheme trains with (`semiseg.losses.fuzzy_positive_loss` is this module's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.pseudo.base import PseudoLabels
from semiseg.pseudo.unlabeled_loss import (
    LossOptions,
    UnlabeledLoss,
    denominator,
    weighted_cross_entropy,
)

Variant = Literal["paper", "official"]
Shape = Literal["concave", "linear", "convex"]

OFFICIAL_MAX_K = 3
"""The released code examines only the top-4 probabilities, so K <= 3 there."""


def _check_variant(variant: str) -> None:
    if variant not in ("paper", "official"):
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")


def check_positive_mask(positive_mask: Tensor, like: Tensor) -> None:
    """Raise ValueError unless `positive_mask` is a bool tensor of `like`'s [B,C,H,W] shape."""
    if positive_mask.shape != like.shape or positive_mask.dtype != torch.bool:
        raise ValueError(
            f"positive_mask must be a bool tensor of shape {tuple(like.shape)}, "
            f"got {positive_mask.dtype} {tuple(positive_mask.shape)}"
        )


def fuzzy_positive_mask(probs: Tensor, T: float, variant: Variant = "paper") -> Tensor:
    """The fuzzy positive label set of every pixel (Alg. 1), as a bool mask [B,C,H,W].

    For the probabilities sorted in decreasing order, n is the first count whose cumulative
    probability exceeds T (n = C when none does) and the set is the top K = max(n - 1, 1)
    classes. Equal probabilities are ordered by class index (a stable sort), so the set is
    deterministic under ties. Because K = n - 1, the set's cumulative probability is at most
    T unless K = 1: a confident pixel (top-1 > T) gets K = 1, i.e. its ordinary pseudo label.

    Args:
        probs: [B,C,H,W] softmax probabilities of the teacher.
        T: cumulative probability bound in [0, 1] (paper: 0.85, 0.9 or 0.95; default 0.9).
        variant: 'paper' tests cumulative > T over all C classes; 'official' tests
            cumulative >= T over the top 4 only, so K <= 3.

    Returns:
        bool [B,C,H,W], True for the K classes of each pixel's set.
    """
    _check_variant(variant)
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B,C,H,W], got shape {tuple(probs.shape)}")
    if not 0.0 <= T <= 1.0:
        raise ValueError(f"T must be in [0, 1], got {T}")
    num_classes = probs.shape[1]
    sorted_probs, order = probs.float().sort(dim=1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=1)
    if variant == "official":
        examined = min(num_classes, OFFICIAL_MAX_K + 1)
        reached = cumulative[:, :examined] >= T
    else:
        examined = num_classes
        reached = cumulative > T
    # n = 1 + the index of the first True; `examined` when there is none (Alg. 1's n = C).
    first = torch.where(reached.any(dim=1), reached.int().argmax(dim=1) + 1, examined)
    k = (first - 1).clamp(min=1)
    ranks = torch.arange(num_classes, device=probs.device).view(1, -1, 1, 1)
    in_set_sorted = ranks < k.unsqueeze(1)
    return torch.zeros_like(in_set_sorted).scatter(1, order, in_set_sorted)


def k_values(positive_mask: Tensor) -> Tensor:
    """K, the size of each pixel's fuzzy positive set: [B,C,H,W] bool -> [B,H,W] int64."""
    return positive_mask.sum(dim=1)


@torch.no_grad()
def adaptive_weight(
    probs: Tensor,
    positive_mask: Tensor,
    A: float = 50.0,
    shape: Shape = "concave",
    variant: Variant = "paper",
) -> Tensor:
    """Per-pixel confidence that the ground truth lies in the fuzzy positive set, [B,H,W].

    With m = mean probability of the K positive classes and x = the largest probability
    outside the set (0 when the set holds every class):

    - concave (Eq. 11, the paper's choice): log(1 + A (m - x)) / log(1 + A m), A = 50;
    - linear (Eq. 16): (m - x) / m;
    - convex (Eq. 16): (m - x) / (m + 4 x).

    All lie in [0, 1]: 1 when no other class competes, 0 when the best outsider is as
    likely as the average positive. The weight carries no gradient, as in the paper.

    Args:
        probs: [B,C,H,W] teacher probabilities; positive_mask: [B,C,H,W] bool, the set.
        variant: 'official' takes m as the mean of the top-(K+1) probabilities (the set
            plus the best outsider), drops the factor 4 of 'convex' (the CPS copy of the
            code) and clamps the weight at 1.
    """
    _check_variant(variant)
    if shape not in ("concave", "linear", "convex"):
        raise ValueError(f"shape must be 'concave', 'linear' or 'convex', got {shape!r}")
    check_positive_mask(positive_mask, probs)
    probs = probs.float()
    k = positive_mask.sum(dim=1).float()
    positive_sum = (probs * positive_mask).sum(dim=1)
    outside = probs.masked_fill(positive_mask, 0.0).amax(dim=1)
    if variant == "official":
        mean_positive = (positive_sum + outside) / (k + 1)
    else:
        mean_positive = positive_sum / k
    gap = (mean_positive - outside).clamp(min=0.0)
    if shape == "concave":
        weight = torch.log1p(A * gap) / torch.log1p(A * mean_positive)
    elif shape == "linear":
        weight = gap / mean_positive
    else:
        factor = 1.0 if variant == "official" else 4.0
        weight = gap / (mean_positive + factor * outside)
    if variant == "official":
        weight = weight.clamp(max=1.0)
    return weight


@torch.no_grad()
def positive_gradient_score(logits: Tensor, positive_mask: Tensor, target: Tensor) -> Tensor:
    """The positive gradient score R of Eq. 12 for the fuzzy positive loss, [B,H,W] float.

    R = dL/dz_gt / sum_{i in Y} dL/dz_i with the gradients of Eq. 8. In closed form, for
    the student logits z: R = exp(-z_gt) / sum_{i in Y} exp(-z_i) when the ground truth is
    in the set (cases 1 and 2, R in [0, 1]) and R = -exp(z_gt) / sum_{j not in Y} exp(z_j)
    when it is not (case 3, R in [-1, 0]; the paper's Eq. 15 prints exp(-z) there, but
    Eq. 8 gives exp(+z)). With a one-class set this is the score of ordinary
    cross-entropy, R^v of Eq. 13-15. Computed in log space, so large logits are safe.

    Args:
        logits: [B,C,H,W] student logits; positive_mask: [B,C,H,W] bool; target: [B,H,W]
            ground truth (255 = unknown gives NaN there).
    """
    z = logits.float()
    known = target != IGNORE_INDEX
    gt = target.clamp(max=z.shape[1] - 1).unsqueeze(1)
    z_gt = z.gather(1, gt).squeeze(1)
    gt_in_set = positive_mask.gather(1, gt).squeeze(1)
    neg_inf = torch.tensor(float("-inf"), device=z.device)
    log_pos = torch.logsumexp(torch.where(positive_mask, -z, neg_inf), dim=1)
    log_neg = torch.logsumexp(torch.where(positive_mask, neg_inf, z), dim=1)
    inside = torch.exp(-z_gt - log_pos)
    outside = -torch.exp(z_gt - log_neg)
    score = torch.where(gt_in_set, inside, outside)
    return score.masked_fill(~known, float("nan"))


def gradient_score_cases(top1: Tensor, positive_mask: Tensor, target: Tensor) -> Tensor:
    """The case of every pixel in the paper's analysis (Sec. 3.4), [B,H,W] int64.

    1 = the pseudo label `top1` [B,H,W] is correct; 2 = it is wrong but the ground truth
    `target` [B,H,W] is in the fuzzy positive set; 3 = the ground truth is outside the set;
    0 = no ground truth (255 in `target`) or no pseudo label (255 in `top1`).
    """
    gt = target.clamp(max=positive_mask.shape[1] - 1).unsqueeze(1)
    in_set = positive_mask.gather(1, gt).squeeze(1)
    case = torch.where(top1 == target, 1, torch.where(in_set, 2, 3))
    return case.masked_fill((target == IGNORE_INDEX) | (top1 == IGNORE_INDEX), 0)


def fuzzy_positive_loss(logits: Tensor, positive_mask: Tensor, reduction: str = "none") -> Tensor:
    """FPL's fuzzy positive regularisation (Eq. 7), unweighted: [B,C,H,W] -> [B,H,W] for 'none'.

    L = log(1 + sum_{i in Y} exp(-z_i) * sum_{j not in Y} exp(z_j)), a smooth version of
    ReLU(max_{j not in Y} z_j - min_{i in Y} z_i) (Eq. 4-6): every class of the fuzzy positive
    set Y (`positive_mask`, bool [B,C,H,W]) is pushed above every class outside it. It is
    computed as softplus(logsumexp_Y(-z) + logsumexp_notY(z)), in float32, so logits of any
    magnitude neither overflow nor give NaN gradients. A one-class set gives exactly the
    cross-entropy of that class (Eq. 9); a set holding every class gives 0.

    Args:
        reduction: 'none' ([B,H,W]), 'mean' or 'sum' over pixels.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    check_positive_mask(positive_mask, logits)
    z = logits.float()
    # A finite stand-in for -inf: logsumexp over an empty side stays finite and its gradient
    # (exp of ~-1e30) is exactly 0, where -inf would give inf - inf = NaN in the backward pass.
    far = torch.tensor(-1e30, device=z.device)
    log_pos = torch.logsumexp(torch.where(positive_mask, -z, far), dim=1)
    log_neg = torch.logsumexp(torch.where(positive_mask, far, z), dim=1)
    per_pixel = F.softplus(log_pos + log_neg)
    if reduction == "mean":
        return per_pixel.mean()
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel


K_BINS = 4
"""K histogram bins logged: K = 1, 2, 3 and >= 4 (the paper's Fig. 4a)."""


def k_histogram(positive: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Share of valid pixels with K = 1, 2, 3 and >= 4 fuzzy positive classes, and the mean K."""
    k = positive.sum(dim=1)[valid]
    n = max(k.numel(), 1)
    logs = {f"fpl/k{j}": (k == j).sum() / n for j in range(1, K_BINS)}
    logs[f"fpl/k{K_BINS}+"] = (k >= K_BINS).sum() / n
    logs["fpl/mean_k"] = k.float().sum() / n
    return logs


def gradient_scores(
    logits: Tensor, target: Tensor, positive: Tensor, oracle: Tensor
) -> dict[str, Tensor | float]:
    """Mean positive gradient score R (Eq. 12) of FPL and of cross-entropy with the pseudo label
    `target` (R^v), per case of Sec. 3.4 (1: pseudo label right, 2: wrong but the truth is in the
    set, 3: the truth is outside it), with each case's share of the pixels that have ground truth."""
    case = gradient_score_cases(target, positive, oracle)
    r_fpl = positive_gradient_score(logits, positive, oracle)
    one_hot = torch.zeros_like(positive).scatter(
        1, target.clamp(max=positive.shape[1] - 1)[:, None], True
    )
    r_ce = positive_gradient_score(logits, one_hot, oracle)
    known = (case > 0).sum()
    logs: dict[str, Tensor | float] = {}
    for c in (1, 2, 3):
        part = case == c
        count = part.sum()
        logs[f"fpl/case{c}_share"] = count / known if known > 0 else float("nan")
        logs[f"fpl/R_case{c}"] = r_fpl[part].mean() if count > 0 else float("nan")
        logs[f"fpl/R_ce_case{c}"] = r_ce[part].mean() if count > 0 else float("nan")
    return logs


@dataclass
class FPLOptions(LossOptions):
    name: str = "fpl"
    T: float = 0.9
    """Cumulative probability bound of the fuzzy positive set (paper: 0.85, 0.9 or 0.95)."""
    adaptive_weight: Literal["concave", "linear", "convex", "none"] = "concave"
    """Per-pixel weight: Eq. 11 (concave), Eq. 16 (linear, convex), or none."""
    A: float = 50.0
    """Steepness of the concave adaptive weight (Eq. 11)."""
    variant: Variant = "paper"
    """As in the paper or as in the released code (K <= 3, >= T, top-(K+1) mean)."""
    rescale: Literal["off", "each", "joint"] = "off"
    """Scale the loss by a detached ratio so that its value is a cross-entropy's (the gradient
    direction stays FPL's): 'each' view to its own weighted cross-entropy (the released AEL
    code); 'joint' all of a step's views by one factor, to their plain mean cross-entropy
    with the pseudo label (the released CPS code: CE(s1, ps2) + CE(s2, ps1))."""

    def validate(self) -> None:
        super().validate()
        self.probability("T")
        self.positive("A")


class FuzzyPositiveLoss(UnlabeledLoss):
    """FPL as an unlabeled loss (`loss.name: fpl`): the teacher's top-K classes form each
    pixel's fuzzy positive set (Alg. 1, from the teacher's probabilities as they are, before
    any alignment a policy applies), the policy's weight is multiplied by the adaptive weight
    (Eq. 11/16), and the student learns Eq. 7 on the set. DAW + FPL is therefore FPL on the
    pixels DAW keeps. Logs the K histogram, under `scheme.oracle_eval` the gradient scores
    R per case, and keeps the K maps of a few unlabeled images at each evaluation.
    """

    name = "fpl"
    Options = FPLOptions
    summary = "FPL's fuzzy positive loss on the teacher's top-K set (Alg. 1, Eq. 7), times its adaptive weight (Eq. 11)"
    snapshot_dir = "fpl_kmaps"
    options: FPLOptions

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        threshold = getattr(cfg.policy, "threshold", None)
        if threshold is not None and threshold >= cfg.loss.T:
            warnings.warn(
                f"policy.threshold {threshold} >= loss.T {cfg.loss.T}: every pixel the threshold "
                "keeps has K = 1, so FPL reduces to (adaptively weighted) cross-entropy; use policy.name="
                "pseudo_label or a lower threshold",
                stacklevel=2,
            )

    def teach(self, probs: Tensor, pl: PseudoLabels) -> PseudoLabels:
        o = self.options
        positive = fuzzy_positive_mask(probs, o.T, o.variant)
        weight = pl.weight
        if o.adaptive_weight != "none":
            weight = weight * adaptive_weight(probs, positive, o.A, o.adaptive_weight, o.variant)
        return PseudoLabels(pl.target, weight, pl.confidence, {**pl.extra, "positive": positive})

    def __init__(self, options: FPLOptions | None = None):
        super().__init__(options)
        self._pending: list[tuple[Tensor, Tensor]] = []

    def __call__(self, logits: Tensor, pl: PseudoLabels, valid: Tensor) -> Tensor:
        weight = pl.weight * valid
        denom = denominator(pl, valid)
        if denom is None:
            denom = valid.sum().clamp(min=1)
        loss = (fuzzy_positive_loss(logits, pl.extra["positive"]) * weight).sum() / denom
        if self.options.rescale == "each":
            ce = weighted_cross_entropy(logits, pl.target, weight, valid, denominator(pl, valid))
            loss = loss * (ce.detach() / loss.detach().clamp(min=1e-12))
        elif self.options.rescale == "joint":
            if bool((pl.target != IGNORE_INDEX).any()):
                plain = F.cross_entropy(
                    logits.float(), pl.target, ignore_index=IGNORE_INDEX
                ).detach()
            else:
                plain = loss.detach() * 0.0
            self._pending.append((loss.detach(), plain))
        return loss

    def combine(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.options.rescale != "joint":
            return terms
        fpl = sum(value for value, _ in self._pending)
        ce = sum(value for _, value in self._pending)
        self._pending = []
        factor = ce / fpl.clamp(min=1e-12)
        return {key: value * factor for key, value in terms.items()}

    def diagnostics(self, pl: PseudoLabels, valid: Tensor) -> dict[str, Tensor | float]:
        return k_histogram(pl.extra["positive"], valid)

    def oracle_diagnostics(
        self, logits: Tensor, pl: PseudoLabels, oracle: Tensor
    ) -> dict[str, Tensor | float]:
        return gradient_scores(logits, pl.target, pl.extra["positive"], oracle)

    def snapshot(self, probs: Tensor) -> dict[str, np.ndarray]:
        k = k_values(fuzzy_positive_mask(probs, self.options.T, self.options.variant))
        return {"k": k.clamp(max=255).to(torch.uint8).cpu().numpy()}
