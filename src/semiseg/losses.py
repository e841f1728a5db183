"""Losses shared by the schemes. Shapes: logits [B,C,H,W], targets [B,H,W] with ignore 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.pseudo.fpl import check_positive_mask


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    F.cross_entropy returns NaN for an all-ignore batch, which a random crop of a
    mostly-void image can produce; a NaN would poison the weights.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor, valid: Tensor) -> Tensor:
    """sum(CE * weight) / #valid pixels: UniMatch's normalisation of the unlabeled loss.

    logits [B,C,H,W]; target [B,H,W] (255 allowed where weight is 0); weight [B,H,W] float
    (0 = unused); valid [B,H,W] bool, the pixels that count in the denominator (not padding).
    Dividing by all valid pixels rather than by the used ones keeps a policy that discards
    most pixels from inflating the few it keeps.
    """
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=255, reduction="none")
    return (per_pixel * weight).sum() / valid.sum().clamp(min=1)


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
