"""Rank-statistics pseudo-label weights (ECCV 2024, "Weighting pseudo-labels via rank statistics").

A pseudo-labeled pixel of class c is trusted as much as its feature "looks like" class c's
prototype, measured not by feature values but by which dimensions are largest: the
overlap s of the top-k feature indices of the pixel and of the prototype (Sec. 3.4). The
weight is W = s / k (paper) or 1 + s / k (released code), and multiplies the confidence-
thresholded cross-entropy (Eq. 5-6). Prototypes are means of per-class memory banks of
labeled and reliable unlabeled pixel features (`semiseg.pseudo.memory.FeatureBank`).

Shapes: features [B,D,H,W], prototypes [C,D], pseudo labels [B,H,W] (255 = none).
Features are ranked by value; the penultimate features the paper uses follow a ReLU, so
value and magnitude agree. Equal values are ranked by dimension index (a stable sort), so
the weight is deterministic under ties.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
Variant = Literal["paper", "official"]


def top_k_indices(values: Tensor, k: int, dim: int) -> Tensor:
    """Indices of the k largest entries along `dim`, ties broken towards the lower index."""
    if not 1 <= k <= values.shape[dim]:
        raise ValueError(f"k must be in [1, {values.shape[dim]}], got {k}")
    return values.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)


def prototype_members(prototypes: Tensor, k: int) -> Tensor:
    """bool [C,D]: True at the top-k dimensions of each class prototype."""
    members = torch.zeros(prototypes.shape, dtype=torch.bool, device=prototypes.device)
    return members.scatter(1, top_k_indices(prototypes, k, dim=1), True)


def rank_overlap(features: Tensor, prototypes: Tensor, k: int = 5) -> Tensor:
    """s for every pixel and every class: #(top-k of the pixel's feature intersect top-k of
    prototype c), int64 [B,C,H,W]. Computed at the features' resolution; memory is that of
    the top-k indices, not of the features times classes."""
    if features.dim() != 4 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"features [B,D,H,W] and prototypes [C,D] must share D, got {tuple(features.shape)} and {tuple(prototypes.shape)}"
        )
    members = prototype_members(prototypes, k)  # [C, D]
    idx = top_k_indices(features, k, dim=1)  # [B, k, H, W]
    # members[:, idx] -> [C, B, k, H, W]: whether each of the pixel's top-k dims is in class c's.
    hits = members[:, idx]
    return hits.sum(dim=2).permute(1, 0, 2, 3)


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
        features: [B,D,H,W] pixel features at the pseudo labels' resolution.
        prototypes: [C,D] class prototypes.
        pseudo_label: [B,H,W] int64 pseudo classes (255: no pseudo label, weight 0).
        k: top-k size (the paper's 5).
        prototype_valid: [C] bool, False for classes without a prototype yet (their pixels
            get weight 1 in both variants); None means all valid.
        variant: 'paper' W = s/k in [0, 1]; 'official' W = 1 + s/k in [1, 2].
    """
    if features.shape[-2:] != pseudo_label.shape[-2:]:
        raise ValueError(
            f"features {tuple(features.shape)} and pseudo labels {tuple(pseudo_label.shape)} differ in size; "
            "use rank_weight_at for features at a lower resolution"
        )
    return _pick(rank_overlap(features, prototypes, k), pseudo_label, k, prototype_valid, variant)


def _pick(s: Tensor, pseudo_label: Tensor, k: int, prototype_valid: Tensor | None, variant: Variant) -> Tensor:
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


def cosine_weight(
    features: Tensor, prototypes: Tensor, pseudo_label: Tensor, prototype_valid: Tensor | None = None
) -> Tensor:
    """The paper's comparison (Fig. 6): cosine similarity of feature and prototype of the
    pseudo class, clamped to [0, 1], [B,H,W] (same conventions as `rank_weight`)."""
    f = F.normalize(features.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=1)
    label = pseudo_label.clamp(max=prototypes.shape[0] - 1)
    chosen = p[label].permute(0, 3, 1, 2)  # [B, D, H, W]
    return _finish((f * chosen).sum(dim=1).clamp(min=0.0), pseudo_label, prototype_valid)


def rank_weight_at(
    features: Tensor,
    prototypes: Tensor,
    pseudo_label: Tensor,
    k: int = 5,
    prototype_valid: Tensor | None = None,
    variant: Variant = "paper",
) -> Tensor:
    """`rank_weight` for features at a lower resolution than the labels (decoder stride):
    the per-class overlaps are computed per feature cell and taken nearest-neighbour at each
    label pixel, which equals `rank_weight` on nearest-upsampled features without
    materialising D x H x W upsampled features. The released code upsamples bilinearly."""
    s = rank_overlap(features, prototypes, k).float()
    s = F.interpolate(s, size=pseudo_label.shape[-2:], mode="nearest").long()
    return _pick(s, pseudo_label, k, prototype_valid, variant)
