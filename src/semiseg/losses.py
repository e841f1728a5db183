"""Losses shared by the schemes. Shapes: logits [B,C,H,W], targets [B,H,W] with ignore 255."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
