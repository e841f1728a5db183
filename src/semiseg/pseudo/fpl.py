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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

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
    known = target != 255
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
    return case.masked_fill((target == 255) | (top1 == 255), 0)
