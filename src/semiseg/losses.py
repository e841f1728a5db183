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
