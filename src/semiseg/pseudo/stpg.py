"""STPG (Synergistic Training with Professional and General modules): pixel selection and dual
contrastive learning with anchors. The paper is the whole specification (no released code).

Pixel selection (Sec. 3.2): per mini-batch confusion matrix m[p, q] = #(Pro-Student predicts
p, Gen-Teacher predicts q), class mismatch scores I (Eq. 5), and the professional targets:
consistent pixels plus the inconsistent ones whose Gen-Teacher class has the larger mismatch
score (Eq. 6).

Dual contrastive learning (Sec. 3.3): C anchors spread on the unit sphere (Eq. 12), matched
one-to-one to EMA class prototypes by the Hungarian method (Eq. 13-14), an anchor
contrastive loss (Eq. 15) and a similarity loss to a per-class memory bank (Eq. 16).
Features are L2-normalised for all of them (a dot product with temperature 0.5 only makes
sense on the unit sphere).

Shapes: class maps [B,H,W] (255 ignored), features [N,D].
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from semiseg.labels import IGNORE_INDEX

Selection = Literal["cons", "cons+lmis", "cons+hmis", "all"]


def confusion(
    pred_student: Tensor, pred_teacher: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """m [C,C] int64 with m[p, q] = #(student predicts p and teacher predicts q); pixels where
    either is `ignore_index` are left out."""
    keep = (pred_student != ignore_index) & (pred_teacher != ignore_index)
    index = pred_student[keep].long() * num_classes + pred_teacher[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def mismatch_scores(
    pred_student: Tensor, pred_teacher: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Eq. 5: I_q = (row_q - m_qq) / row_q + (col_q - m_qq) / col_q, float [C] in [0, 2].

    The first term is the share of the student's class-q pixels the teacher calls otherwise,
    the second the share of the teacher's class-q pixels the student calls otherwise. A 0/0
    term (a class neither predicts) counts as 0.
    """
    m = confusion(pred_student, pred_teacher, num_classes, ignore_index).double()
    diag = m.diag()
    rows, cols = m.sum(dim=1), m.sum(dim=0)
    first = torch.where(rows > 0, (rows - diag) / rows.clamp(min=1), torch.zeros_like(rows))
    second = torch.where(cols > 0, (cols - diag) / cols.clamp(min=1), torch.zeros_like(cols))
    return (first + second).float()


def select_professional(pred_student: Tensor, pred_teacher: Tensor, scores: Tensor) -> Tensor:
    """Eq. 6: consistent pixels, plus inconsistent ones whose teacher class has the larger
    mismatch score (I[student] < I[teacher]); bool [B,H,W]."""
    return selection_mask(pred_student, pred_teacher, scores, "cons+hmis")


def selection_mask(
    pred_student: Tensor, pred_teacher: Tensor, scores: Tensor, selection: Selection
) -> Tensor:
    """The pixels of Gen-Teacher's pseudo labels that supervise Pro-Student, for the paper's
    Table 5 ablation: 'cons' (consistent only), 'cons+lmis', 'cons+hmis' (the method) or
    'all'. Low-mismatch pixels are the inconsistent ones that are not highly mismatched."""
    consistent, high, low = mismatch_parts(pred_student, pred_teacher, scores)
    if selection == "all":
        return consistent | high | low
    if selection == "cons":
        return consistent
    if selection == "cons+hmis":
        return consistent | high
    if selection == "cons+lmis":
        return consistent | low
    raise ValueError(
        f"selection must be 'cons', 'cons+lmis', 'cons+hmis' or 'all', got {selection!r}"
    )


def mismatch_parts(
    pred_student: Tensor, pred_teacher: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(consistent, highly mismatched, lowly mismatched) bool [B,H,W] maps; they partition the
    pixels where neither prediction is 255."""
    known = (pred_student != IGNORE_INDEX) & (pred_teacher != IGNORE_INDEX)
    consistent = known & (pred_student == pred_teacher)
    last = scores.shape[0] - 1
    higher = (
        scores[pred_student.long().clamp(max=last)] < scores[pred_teacher.long().clamp(max=last)]
    )
    inconsistent = known & ~consistent
    return consistent, inconsistent & higher, inconsistent & ~higher


def anchor_loss(anchors: Tensor, tau: float = 0.5) -> Tensor:
    """Eq. 12: (1/C) sum_i log sum_j exp(v_i . v_j / tau) on L2-normalised anchors [C,D];
    minimal when the anchors are spread evenly (equidistant) on the sphere."""
    v = F.normalize(anchors, dim=1)
    return torch.logsumexp(v @ v.T / tau, dim=1).mean()


def optimize_anchors(
    num_classes: int, dim: int, tau: float = 0.5, steps: int = 2000, seed: int = 0
) -> Tensor:
    """C unit anchors [C,D] from random initialisation, minimising Eq. 12 with Adam; done once,
    before training, as a function of `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(num_classes, dim, generator=generator).requires_grad_(True)
    optimizer = torch.optim.Adam([anchors], lr=0.01)
    for _ in range(steps):
        loss = anchor_loss(anchors, tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(anchors.detach(), dim=1)


def match_anchors(prototypes: Tensor, anchors: Tensor) -> Tensor:
    """Eq. 14: the permutation sigma [C] (class i -> anchor sigma[i]) minimising
    sum_i ||v_sigma(i) - c_i|| (Hungarian method, scipy's linear_sum_assignment)."""
    cost = torch.cdist(prototypes.double(), anchors.double()).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    sigma = np.empty(len(rows), dtype=np.int64)
    sigma[rows] = cols
    return torch.from_numpy(sigma)


def ema_prototypes(
    prototypes: Tensor,
    features: Tensor,
    labels: Tensor,
    alpha: float = 0.99,
    seen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 13: c_i <- alpha c_i + (1 - alpha) mean(features of class i in this step), for the
    classes present; a class seen for the first time takes its mean directly. Returns the new
    prototypes [C,D] and the updated `seen` [C] bool."""
    num_classes = prototypes.shape[0]
    seen = torch.zeros(num_classes, dtype=torch.bool) if seen is None else seen.clone()
    out = prototypes.clone()
    for c in labels.unique().tolist():
        if not 0 <= c < num_classes:
            continue
        mean = features[labels == c].mean(dim=0)
        out[c] = alpha * prototypes[c] + (1 - alpha) * mean if seen[c] else mean
        seen[c] = True
    return out, seen


def anchor_contrastive_loss(
    features: Tensor, labels: Tensor, anchors: Tensor, sigma: Tensor, tau: float = 0.5
) -> Tensor:
    """Eq. 15, mean over the given pixels: -log(e^{f.v_c/tau} / (e^{f.v_c/tau} + sum_{c' != c}
    e^{f.v_c'/tau})), with v_c = anchors[sigma[c]] and f L2-normalised: the cross-entropy of
    the anchor similarities. features [N,D], labels [N]."""
    if features.shape[0] == 0:
        return features.sum() * 0.0
    logits = F.normalize(features, dim=1) @ anchors[sigma].to(features.dtype).T / tau
    return F.cross_entropy(logits, labels.long())


def similarity_loss(
    features: Tensor, labels: Tensor, bank_means: Tensor, bank_valid: Tensor
) -> Tensor:
    """Eq. 16, mean over the given pixels: (1/|Q_c|) sum_{i in Q_c} (1 - cos(f, i)) =
    1 - f_hat . mean(normalised bank features of c). bank_means [C,D] are those means (of
    unit vectors); pixels whose class has an empty bank are left out."""
    keep = bank_valid[labels.long()]
    if not bool(keep.any()):
        return features.sum() * 0.0
    f = F.normalize(features[keep], dim=1)
    return (1 - (f * bank_means[labels[keep].long()].to(f.dtype)).sum(dim=1)).mean()
