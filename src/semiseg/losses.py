"""Losses of the schemes. Shapes: logits [B,C,H,W], targets [B,H,W] with ignore 255.

`cross_entropy` is the labeled loss; the unlabeled losses are components in
`semiseg.pseudo` (`weighted_cross_entropy` there, and FPL's `fuzzy_positive_loss` (Eq. 7)
with the rest of FPL in `semiseg.pseudo.fpl`), re-exported here so that every loss function
has one import path.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.pseudo.fpl import fuzzy_positive_loss
from semiseg.pseudo.unlabeled_loss import weighted_cross_entropy

__all__ = ["cross_entropy", "fuzzy_positive_loss", "weighted_cross_entropy"]


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    F.cross_entropy returns NaN for an all-ignore batch, which a random crop of a
    mostly-void image can produce; a NaN would poison the weights.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
