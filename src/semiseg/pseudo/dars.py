"""Offline pseudo labels for self-training rounds (DARS, He et al., ICCV 2021) and its baselines.

Given the teacher's confidence `conf` [N,H,W] and predicted class `pred` [N,H,W] on the
whole unlabeled set, each generator keeps some pixels (their predicted class) and ignores
the rest (255):

- ST: one confidence threshold, or the top `alpha` of all pixels by confidence;
- CBST: the top `alpha` of the pixels predicted as each class, class by class;
- DA (Eq. 3-4): class j keeps the pixels predicted j whose confidence is at least t_j, the
  n_j-th largest such confidence, with n_j = alpha * N*H*W * r_j and r the labeled class
  distribution; ties at t_j are kept, so a class with many equal confidences overfills;
- DARS (Alg. 1): DA, then each over-full class is randomly subsampled to exactly n_j.

DA+TS is DA on temperature-scaled probabilities (softmax(logits / T), T = 1.27 in the paper):
temperature belongs to how `conf` is computed, not to the generator.

These in-memory functions are the reference for small sets and tests; the streaming
generator (`semiseg.pseudolabel`) computes the same thresholds from per-class histograms of
float16 confidences and gives the same counts without holding the set in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

IGNORE_INDEX = 255


def class_ratio(counts: Tensor) -> Tensor:
    """Pixel counts per class [C] -> class distribution r [C] (float64, sums to 1)."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labeled pixels to compute a class distribution from")
    return counts / total


def target_counts(ratio: Tensor, alpha: float, total_pixels: int) -> Tensor:
    """Eq. 4: n_j = int(alpha * total_pixels * r_j) pixels for class j, int64 [C]."""
    _check_alpha(alpha)
    return torch.floor(alpha * total_pixels * ratio.double()).long()


def kl_divergence(reference: Tensor, counts: Tensor, eps: float = 1e-12) -> float:
    """D_KL(reference || distribution of `counts`) in nats (the paper's Table 5 measure).

    reference: [C] labeled class distribution; counts: [C] pseudo-label pixel counts. A class
    the reference has but the pseudo labels lack contributes through `eps` (a large, finite
    penalty) instead of infinity.
    """
    p = reference.double()
    total = counts.double().sum()
    q = counts.double() / total if total > 0 else torch.zeros_like(p)
    mask = p > 0
    return float((p[mask] * (p[mask].log() - (q[mask] + eps).log())).sum())


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"labeling ratio alpha must be in [0, 1], got {alpha}")


def _check_maps(conf: Tensor, pred: Tensor) -> None:
    if conf.shape != pred.shape:
        raise ValueError(
            f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} must have the same shape"
        )


def nth_largest(values: Tensor, n: int) -> float | None:
    """The n-th largest value (1-based) of a 1-D tensor; None when n = 0 (keep nothing);
    the smallest value when n exceeds the count (keep everything)."""
    if n <= 0 or values.numel() == 0:
        return None
    n = min(n, values.numel())
    return float(values.topk(n).values[-1])


def st_labels(
    conf: Tensor, pred: Tensor, threshold: float | None = None, alpha: float | None = None
) -> Tensor:
    """ST: keep pixels with conf >= `threshold`, or (given `alpha`) the top alpha of all
    pixels: conf >= the int(alpha * #pixels)-th largest confidence, ties kept."""
    _check_maps(conf, pred)
    if (threshold is None) == (alpha is None):
        raise ValueError("ST takes exactly one of threshold and alpha")
    if alpha is not None:
        _check_alpha(alpha)
        threshold = nth_largest(conf.flatten(), math.floor(alpha * conf.numel()))
        if threshold is None:
            return torch.full_like(pred, IGNORE_INDEX)
    return torch.where(conf >= threshold, pred, IGNORE_INDEX)


def class_thresholds(conf: Tensor, pred: Tensor, wanted: Tensor) -> list[float | None]:
    """t_j = the wanted[j]-th largest confidence among pixels predicted j (None: drop the class)."""
    return [nth_largest(conf[pred == j], int(wanted[j])) for j in range(len(wanted))]


def apply_thresholds(conf: Tensor, pred: Tensor, thresholds: list[float | None]) -> Tensor:
    """Keep the pixels of class j with conf >= t_j (ties kept); 255 elsewhere."""
    keep = torch.zeros_like(pred, dtype=torch.bool)
    for j, t in enumerate(thresholds):
        if t is not None:
            keep |= (pred == j) & (conf >= t)
    return torch.where(keep, pred, IGNORE_INDEX)


def cbst_labels(conf: Tensor, pred: Tensor, num_classes: int, alpha: float) -> Tensor:
    """CBST: per predicted class j, keep conf >= the int(alpha * len_j)-th largest of its
    confidences (the same ratio for every class; ties kept)."""
    _check_maps(conf, pred)
    _check_alpha(alpha)
    lengths = torch.bincount(pred.flatten().long(), minlength=num_classes)[:num_classes]
    wanted = torch.floor(alpha * lengths.double()).long()
    return apply_thresholds(conf, pred, class_thresholds(conf, pred, wanted))


def da_labels(conf: Tensor, pred: Tensor, ratio: Tensor, alpha: float) -> Tensor:
    """DA (Eq. 3-4): class j keeps conf >= t_j, the n_j-th largest confidence of the pixels
    predicted j, n_j = int(alpha * N*H*W * r_j); ties at t_j are kept (so it may overfill)."""
    _check_maps(conf, pred)
    wanted = target_counts(ratio, alpha, conf.numel())
    return apply_thresholds(conf, pred, class_thresholds(conf, pred, wanted))


def dars_labels(
    conf: Tensor,
    pred: Tensor,
    class_ratio: Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARS (Alg. 1): distribution alignment, then random sampling to exactly n_j per class.

    Args:
        conf: [N,H,W] teacher confidence (max probability); pred: [N,H,W] predicted class.
        class_ratio: [C] labeled class distribution r (sums to 1).
        alpha: labeling ratio; n_j = int(alpha * N*H*W * r_j) (Eq. 4).
        generator: the random sampling's generator (CPU), for reproducible labels.

    Returns:
        [N,H,W] int64 pseudo labels, 255 where ignored. Class j gets exactly
        min(n_j, #pixels predicted j) pixels: DA's t_j (ties at t_j kept), then a uniform
        random subset of the kept pixels of each over-full class (Line 5-6). A class that is
        never predicted gets none.
    """
    labels = da_labels(conf, pred, class_ratio, alpha).flatten()
    wanted = target_counts(class_ratio, alpha, conf.numel())
    for j in range(len(wanted)):
        kept = torch.nonzero(labels == j).flatten()
        extra = kept.numel() - int(wanted[j])
        if extra > 0:
            order = torch.randperm(kept.numel(), generator=generator)
            labels[kept[order[:extra]]] = IGNORE_INDEX
    return labels.view_as(pred).long()


HALF_BINS = 0x3C00 + 1
"""Non-negative float16 values up to 1.0, as bit patterns 0..0x3C00 (monotonic in value)."""


def half_bits(conf: Tensor) -> Tensor:
    """Confidences in [0, 1] -> the int64 bit patterns of their float16 rounding (an exact,
    order-preserving bin index: 15,361 bins, relative precision 2^-11)."""
    bits = conf.clamp(0.0, 1.0).half().view(torch.int16).long()
    return bits


def bits_to_confidence(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int16).view(torch.float16))


class ConfidenceHistogram:
    """Per-class counts of float16 confidences, for exact thresholds over a streamed set.

    `add` takes one image (or batch) at a time; `class_thresholds` then returns, for each
    class, the n_j-th largest confidence among its pixels and how many pixels reach it,
    exactly as sorting every float16-rounded confidence of the set would, in C x 15,361
    int64 counters (1.7 MB for 19 classes) instead of the whole set. Counts are sums, so
    histograms of shards (processes, resumed chunks) add up: `merge`.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, HALF_BINS, dtype=torch.int64)

    def add(self, conf: Tensor, pred: Tensor) -> None:
        """Count pixels with confidence `conf` and predicted class `pred` (same shape)."""
        _check_maps(conf, pred)
        pred = pred.flatten().long().cpu()
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(
                f"predicted classes must be in [0, {self.num_classes}), got {int(pred.max())}"
            )
        index = pred * HALF_BINS + half_bits(conf.flatten().cpu())
        self.counts += torch.bincount(index, minlength=self.counts.numel()).view_as(self.counts)

    def merge(self, other: ConfidenceHistogram) -> None:
        self.counts += other.counts

    def class_totals(self) -> Tensor:
        return self.counts.sum(dim=1)

    def class_thresholds(self, wanted: Tensor) -> tuple[list[float | None], Tensor]:
        """(t_j, kept_j) for each class: t_j = the wanted[j]-th largest confidence of class j
        (None when wanted[j] = 0; the smallest when wanted[j] exceeds the class's pixels) and
        kept_j = #(pred = j and conf >= t_j), ties included."""
        thresholds: list[float | None] = []
        kept = torch.zeros(self.num_classes, dtype=torch.int64)
        for j in range(self.num_classes):
            t, k = _top_threshold(self.counts[j], int(wanted[j]))
            thresholds.append(t)
            kept[j] = k
        return thresholds, kept

    def global_threshold(self, wanted: int) -> tuple[float | None, int]:
        """The wanted-th largest confidence over all classes and how many pixels reach it."""
        return _top_threshold(self.counts.sum(dim=0), wanted)


def _top_threshold(counts: Tensor, wanted: int) -> tuple[float | None, int]:
    total = int(counts.sum())
    if wanted <= 0 or total == 0:
        return None, 0
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, min(wanted, total)))
    bits = HALF_BINS - 1 - position
    return bits_to_confidence(bits), int(from_top[position])
