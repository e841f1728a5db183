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

One implementation serves both the in-memory functions (`dars_labels` and friends, for
small sets and tests) and the streaming generator (`semiseg.offline.label_set`):
`plan_thresholds` reads every generator's thresholds from class counts (`ExactCounts` of the
confidences in memory, or a `ConfidenceHistogram` of float16-rounded ones, exact on those
values without holding the set), `thresholded` applies them, and DARS' random sampling is
`allot` (how many pixels of each class every image keeps) then `subsample` (which ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from semiseg.labels import IGNORE_INDEX

Method = Literal["st", "cbst", "da", "dars"]


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
    kl = float((p[mask] * (p[mask].log() - (q[mask] + eps).log())).sum())
    # eps lifts every log q a little, so a distribution equal to the reference gives about
    # -C * eps instead of 0; the divergence itself is never negative.
    return max(kl, 0.0)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"labeling ratio alpha must be in [0, 1], got {alpha}")


def _check_maps(conf: Tensor, pred: Tensor) -> None:
    if conf.shape != pred.shape:
        raise ValueError(
            f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} must have the same shape"
        )


@dataclass
class GeneratorSpec:
    """Which pixels a generator keeps.

    method: 'st' (one threshold, or the top alpha of all pixels), 'cbst' (the top alpha of
        each predicted class), 'da' (class thresholds for n_j = alpha * pixels * r_j, ties
        kept) or 'dars' (DA, then random sampling to exactly n_j).
    alpha: labeling ratio (all but ST with `threshold`).
    threshold: ST's fixed confidence threshold instead of alpha.
    temperature: logits are divided by it before the softmax (TS; the paper's T = 1.27).
    variant: 'official' reproduces the released code: CBST keeps int(alpha * len_j) + 1
        pixels of class j, DARS samples each image separately (drop int(c - c * s_j) of its
        c kept class-j pixels, s_j = n_j / kept_j), and the softmax runs in float16.
    """

    method: Method = "dars"
    alpha: float | None = 0.2
    threshold: float | None = None
    temperature: float = 1.0
    variant: Literal["paper", "official"] = "paper"

    def __post_init__(self) -> None:
        if self.method not in ("st", "cbst", "da", "dars"):
            raise ValueError(
                f"unknown pseudo-label method {self.method!r}; use st, cbst, da or dars"
            )
        if self.variant not in ("paper", "official"):
            raise ValueError(f"variant must be 'paper' or 'official', got {self.variant!r}")
        if self.method == "st" and (self.alpha is None) == (self.threshold is None):
            raise ValueError("ST takes exactly one of alpha (a labeling ratio) and threshold")
        if self.method != "st" and self.alpha is None:
            raise ValueError(f"{self.method} needs a labeling ratio alpha")
        if self.alpha is not None:
            _check_alpha(self.alpha)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


class ClassCounts(Protocol):
    """How many pixels of each predicted class reach a confidence: what the thresholds of
    every generator are read from. `ExactCounts` holds the confidences of a set in memory;
    `ConfidenceHistogram` counts float16-rounded confidences of a streamed set."""

    def total(self) -> int: ...

    def class_totals(self) -> Tensor: ...

    def class_thresholds(self, wanted: Tensor) -> tuple[list[float | None], Tensor]: ...

    def global_threshold(self, wanted: int) -> tuple[float | None, int]: ...

    def count_at_least(self, j: int, threshold: float | None) -> int: ...


def nth_largest(values: Tensor, n: int) -> float | None:
    """The n-th largest value (1-based) of a 1-D tensor; None when n = 0 (keep nothing);
    the smallest value when n exceeds the count (keep everything)."""
    if n <= 0 or values.numel() == 0:
        return None
    n = min(n, values.numel())
    return float(values.topk(n).values[-1])


class ExactCounts:
    """`ClassCounts` of confidences held in memory, exact at their own precision."""

    def __init__(self, conf: Tensor, pred: Tensor, num_classes: int):
        _check_maps(conf, pred)
        self.conf, self.pred, self.num_classes = conf.flatten(), pred.flatten().long(), num_classes

    def total(self) -> int:
        return self.conf.numel()

    def class_totals(self) -> Tensor:
        return torch.bincount(self.pred, minlength=self.num_classes)[: self.num_classes]

    def _values(self, j: int) -> Tensor:
        return self.conf[self.pred == j]

    def class_thresholds(self, wanted: Tensor) -> tuple[list[float | None], Tensor]:
        thresholds = [nth_largest(self._values(j), int(wanted[j])) for j in range(self.num_classes)]
        kept = torch.tensor(
            [self.count_at_least(j, t) for j, t in enumerate(thresholds)], dtype=torch.int64
        )
        return thresholds, kept

    def global_threshold(self, wanted: int) -> tuple[float | None, int]:
        t = nth_largest(self.conf, wanted)
        return t, 0 if t is None else int((self.conf >= t).sum())

    def count_at_least(self, j: int, threshold: float | None) -> int:
        return 0 if threshold is None else int((self._values(j) >= threshold).sum())


@dataclass
class Plan:
    """What the thresholds pass decided: per-class thresholds (None = drop the class),
    targets n_j (DA and DARS) and the pixels of each class that reach its threshold."""

    thresholds: list[float | None]
    targets: list[int] | None
    kept: list[int]

    def threshold_tensor(self) -> Tensor:
        return torch.tensor(
            [math.inf if t is None else t for t in self.thresholds], dtype=torch.float32
        )


def plan_thresholds(spec: GeneratorSpec, counts: ClassCounts, ratio: Tensor | None) -> Plan:
    """Every generator's thresholds: ST one for all classes (fixed, or the top alpha of all
    pixels), CBST the top alpha of each class, DA and DARS the n_j-th largest confidence of
    class j (Eq. 3-4; ties at t_j kept). `ratio` is the labeled class distribution (DA, DARS)."""
    num_classes = len(counts.class_totals())
    if spec.method == "st":
        if spec.threshold is not None:
            t: float | None = spec.threshold
        else:
            assert spec.alpha is not None
            t, _ = counts.global_threshold(math.floor(spec.alpha * counts.total()))
        return Plan(
            [t] * num_classes, None, [counts.count_at_least(j, t) for j in range(num_classes)]
        )
    assert spec.alpha is not None
    if spec.method == "cbst":
        wanted = torch.floor(spec.alpha * counts.class_totals().double()).long()
        if spec.variant == "official":
            wanted = wanted + 1
        thresholds, kept = counts.class_thresholds(wanted)
        return Plan(thresholds, None, kept.tolist())
    if ratio is None:
        raise ValueError(f"{spec.method} needs the labeled class distribution")
    targets = target_counts(ratio, spec.alpha, counts.total())
    thresholds, kept = counts.class_thresholds(targets)
    return Plan(thresholds, targets.tolist(), kept.tolist())


def candidates(conf: Tensor, pred: Tensor, thresholds: Tensor) -> Tensor:
    """Pixels whose confidence reaches their predicted class's threshold (bool, conf's shape);
    `thresholds` [C] float32, inf for a dropped class."""
    return conf.float() >= thresholds[pred.long()]


def thresholded(conf: Tensor, pred: Tensor, plan: Plan) -> Tensor:
    """The predicted class where it reaches its threshold, 255 elsewhere (int64, pred's shape)."""
    return torch.where(candidates(conf, pred, plan.threshold_tensor()), pred.long(), IGNORE_INDEX)


NUMPY_HYPERGEOMETRIC_LIMIT = 10**9


def allot(per_image: np.ndarray, plan: Plan, variant: str, rng: np.random.Generator) -> np.ndarray:
    """DARS' random sampling (Alg. 1, Lines 5-6) as counts: of the kept pixels of each class
    per image `per_image` [N,C], how many each image keeps, int64 [N,C].

    Paper variant: image by image, the number of class-j candidates kept follows the
    hypergeometric law of drawing the image's candidates from those left, with the class's
    remaining quota as successes, so class j ends with exactly min(n_j, kept_j) pixels and,
    with a uniform choice inside each image (`subsample`), every subset of that size is
    equally likely. (numpy draws it exactly below 10^9 candidates; above, a normal
    approximation with the same mean and variance, clipped to the feasible range, keeps the
    total exact.) Official variant: s_j = n_j / kept_j and each image keeps c - int(c - c * s_j)
    of its c candidates.
    """
    assert plan.targets is not None
    count, num_classes = per_image.shape
    if variant == "official":
        totals = per_image.sum(axis=0)
        s = np.where(
            totals > 0, np.minimum(1.0, np.array(plan.targets) / np.maximum(totals, 1)), 1.0
        )
        return per_image - (per_image - per_image * s).astype(np.int64)
    quota = np.minimum(np.array(plan.targets, dtype=np.int64), per_image.sum(axis=0))
    remaining = per_image.sum(axis=0)
    out = np.zeros_like(per_image)
    for i in range(count):
        for j in range(num_classes):
            c = int(per_image[i, j])
            if c == 0:
                continue
            out[i, j] = _draw_hypergeometric(rng, int(quota[j]), int(remaining[j] - quota[j]), c)
            quota[j] -= out[i, j]
            remaining[j] -= c
    return out


def _draw_hypergeometric(rng: np.random.Generator, good: int, bad: int, sample: int) -> int:
    low, high = max(0, sample - bad), min(sample, good)
    if low == high:
        return low
    if good < NUMPY_HYPERGEOMETRIC_LIMIT and bad < NUMPY_HYPERGEOMETRIC_LIMIT:
        return int(rng.hypergeometric(good, bad, sample))
    total = good + bad
    mean = sample * good / total
    var = sample * (good / total) * (bad / total) * (total - sample) / max(total - 1, 1)
    return int(min(high, max(low, round(rng.normal(mean, math.sqrt(var))))))


def subsample(
    labels: Tensor, keep_counts: np.ndarray, generator: torch.Generator | None = None
) -> Tensor:
    """Keep `keep_counts[j]` uniformly chosen pixels of each class j of one image's labels."""
    flat = labels.flatten().clone()
    for j, keep in enumerate(keep_counts.tolist()):
        where = torch.nonzero(flat == j).flatten()
        if where.numel() > keep:
            order = torch.randperm(where.numel(), generator=generator)
            flat[where[order[keep:]]] = IGNORE_INDEX
    return flat.view_as(labels)


def class_counts_per_image(labels: Tensor, num_classes: int) -> np.ndarray:
    """Pixels of each class in each image of labels [N,H,W] (255 left out), int64 [N,C]."""
    flat = labels.flatten(1).long()
    out = np.zeros((flat.shape[0], num_classes), dtype=np.int64)
    for i, row in enumerate(flat):
        out[i] = torch.bincount(row[row != IGNORE_INDEX], minlength=num_classes)[
            :num_classes
        ].numpy()
    return out


def generate_labels(
    conf: Tensor,
    pred: Tensor,
    spec: GeneratorSpec,
    ratio: Tensor | None = None,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pseudo labels [N,H,W] (int64, 255 ignored) of `spec` for a set held in memory: the
    thresholds of `plan_thresholds` on exact confidences, then, for DARS, `allot` and
    `subsample` with `generator`. The streaming `semiseg pseudo-label` runs the same steps
    on float16-rounded confidences, image by image."""
    _check_maps(conf, pred)
    if num_classes is None:
        num_classes = (
            len(ratio) if ratio is not None else int(pred.max()) + 1 if pred.numel() else 1
        )
    plan = plan_thresholds(spec, ExactCounts(conf, pred, num_classes), ratio)
    labels = thresholded(conf, pred, plan)
    if spec.method != "dars":
        return labels
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    allotment = allot(
        class_counts_per_image(labels, num_classes), plan, spec.variant, np.random.default_rng(seed)
    )
    return torch.stack(
        [subsample(labels[i], allotment[i], generator) for i in range(labels.shape[0])]
    )


def st_labels(
    conf: Tensor, pred: Tensor, threshold: float | None = None, alpha: float | None = None
) -> Tensor:
    """ST: keep pixels with conf >= `threshold`, or (given `alpha`) the top alpha of all
    pixels: conf >= the int(alpha * #pixels)-th largest confidence, ties kept."""
    if (threshold is None) == (alpha is None):
        raise ValueError("ST takes exactly one of threshold and alpha")
    return generate_labels(
        conf,
        pred,
        GeneratorSpec("st", alpha=alpha, threshold=threshold),
        num_classes=_classes(pred),
    )


def cbst_labels(conf: Tensor, pred: Tensor, num_classes: int, alpha: float) -> Tensor:
    """CBST: per predicted class j, keep conf >= the int(alpha * len_j)-th largest of its
    confidences (the same ratio for every class; ties kept)."""
    return generate_labels(conf, pred, GeneratorSpec("cbst", alpha=alpha), num_classes=num_classes)


def da_labels(conf: Tensor, pred: Tensor, ratio: Tensor, alpha: float) -> Tensor:
    """DA (Eq. 3-4): class j keeps conf >= t_j, the n_j-th largest confidence of the pixels
    predicted j, n_j = int(alpha * N*H*W * r_j); ties at t_j are kept (so it may overfill)."""
    return generate_labels(conf, pred, GeneratorSpec("da", alpha=alpha), ratio)


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
    return generate_labels(
        conf, pred, GeneratorSpec("dars", alpha=alpha), class_ratio, generator=generator
    )


def _classes(pred: Tensor) -> int:
    return int(pred.max()) + 1 if pred.numel() else 1


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

    def total(self) -> int:
        return int(self.counts.sum())

    def class_totals(self) -> Tensor:
        return self.counts.sum(dim=1)

    def count_at_least(self, j: int, threshold: float | None) -> int:
        """Pixels of class j whose float16-rounded confidence is at least `threshold`."""
        if threshold is None:
            return 0
        return int(self.counts[j, int(half_bits(torch.tensor([threshold]))[0]) :].sum())

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
