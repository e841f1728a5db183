"""DAW: Distribution-Aware Weighting (Sun et al., NeurIPS 2023).

The max confidence p of correct ("positive") and incorrect ("negative") predictions on
labeled pixels is modelled by two Gaussians truncated to [1/C, 1] (Eq. 3-4), fitted per
batch (Eq. 5) and smoothed by an EMA (Eq. 6). The weighting function minimising the
trade-off E1 + E2 (Eq. 7-10) is a step at the crossing t* of the two densities (Eq. 11;
"DAWF"). Distribution alignment ("DA", Eq. 12) rescales unlabeled probabilities by the ratio
of the labeled to the unlabeled expected class distribution before the confidence and the
pseudo label are read off (Eq. 13).

Two variants:

* ``paper``: the equations as written.
* ``official``: what the released code (yuisuen/DAW, class ``optimal_threshold``) computes:
  t* without the truncation normalisers and with its epsilons, clamped to [1/C, 1];
  initial variance 0.5 and threshold 0.95; pixels pooled over the batch, a set with fewer
  than 10 pixels leaves its EMA alone; DA on per-class mean max-confidence.

Precision: the Gaussian fits and the DA distributions are float64 state (a handful of
scalars and two [C] vectors); per-pixel confidences are raised to float64 before they are
summed. Class sums over [B,C,H,W] probabilities are taken in float32, because a float64
copy of the probabilities would cost C times the memory of the confidences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.pseudo.base import Policy, PolicyOptions

VARIANTS = ("paper", "official")

# Fewest pixels a set needs to move its EMA: an unbiased variance needs two (paper); the
# released code demands ten.
_MIN_PIXELS = {"paper": 2, "official": 10}
# The released code's initial variance and threshold (the paper's are 1.0 and, here, 1/C).
_OFFICIAL_INIT_VAR = 0.5
_OFFICIAL_INIT_THRESHOLD = 0.95


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _log_normal_mass(lo: float, hi: float) -> float:
    """log(Phi(hi) - Phi(lo)) of the standard normal; -inf when lo >= hi.

    Both tails stay accurate: the right tail is mirrored onto the left one, where
    log Phi has no cancellation, so a fit far from [1/C, 1] does not underflow to log(0).
    """
    if lo >= hi:
        return -math.inf
    if lo > 0.0:
        lo, hi = -hi, -lo
    log_lo, log_hi = torch.special.log_ndtr(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
    return log_hi + math.log1p(-math.exp(log_lo - log_hi))


def _log_truncated_mass(mu: float, sigma: float, lo: float, hi: float) -> float:
    """log of the N(mu, sigma^2) probability of [lo, hi]."""
    return _log_normal_mass((lo - mu) / sigma, (hi - mu) / sigma)


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def optimal_threshold(
    mu_pos: float | Tensor,
    var_pos: float | Tensor,
    mu_neg: float | Tensor,
    var_neg: float | Tensor,
    num_classes: int,
    variant: str = "paper",
) -> float | None:
    """The jump point t* of the optimal step weighting function (DAW Eq. 11), or None.

    Derivation (Eq. 9-11). E1 + E2 = 1 + int_{1/C}^1 f(p) [g-(p) - g+(p)] dp with
    0 <= f <= 1 is minimised pointwise by f(p) = 1 where g+(p) > g-(p). With the truncated
    Gaussians of Eq. 3-4, g+ = alpha N(mu+, s+^2), g- = beta N(mu-, s-^2), where
    1/alpha = Phi((1-mu+)/s+) - Phi((1/C-mu+)/s+) and likewise 1/beta for the negative fit,
    the sign of g+ - g- is the sign of

        Q(p) = 2 s+^2 s-^2 ln(g+(p) / g-(p))
             = s+^2 (p - mu-)^2 - s-^2 (p - mu+)^2 + 2 s+^2 s-^2 ln(alpha s- / (beta s+))
             = beta1 p^2 + beta2 p + beta3,

    beta1 = s+^2 - s-^2, beta2 = 2 (mu+ s-^2 - mu- s+^2),
    beta3 = (s+ mu-)^2 - (s- mu+)^2 + 2 (s+ s-)^2 ln(alpha s- / (beta s+)).

    Root chosen: t* = (sqrt(beta2^2 - 4 beta1 beta3) - beta2) / (2 beta1), the paper's sign.
    There Q'(t*) = 2 beta1 t* + beta2 = +sqrt(discriminant) >= 0, so it is always the
    crossing where the positive density takes over as p grows (the larger root when
    s+ > s-, the smaller one when s+ < s-, the usual case late in training); the other root
    is where the wider negative tail would take over again, normally above 1, and the
    paper's f*(p) = 1 on [t*, 1] ignores it. We keep that choice.

    Args:
        mu_pos, var_pos, mu_neg, var_neg: mean and variance of the positive and negative
            fits (floats or 0-d tensors; variances >= 0).
        num_classes: C, the lower end 1/C of the confidence range.
        variant: ``paper``: the root above with the truncation normalisers. beta1 = 0 (equal
            variances) gives the linear root -beta3/beta2 (None if beta2 = 0 too, i.e.
            identical fits); a negative discriminant gives None (the caller keeps its
            previous t*). For s+, s- > 0 that cannot happen in exact arithmetic: two densities
            normalised on the same interval [1/C, 1] must cross inside it, so Q has a real
            root; the check guards rounding. Not clamped: a root outside [1/C, 1] selects all or no pixels,
            which is what the step does on [1/C, 1]. Evaluated in float64 as
            -2 beta3 / (sqrt(disc) + beta2) when beta2 > 0, the same number without the
            cancellation the textbook form suffers when beta1 is near 0.
            ``official``: the released code's expression: no normalisers (alpha = beta = 1),
            ln(s-/s+ + 1e-8), denominator 2 beta1 + 1e-10, None unless the discriminant is
            > 0, result clamped to [1/C, 1]; equal variances therefore give 1/C when
            mu+ > mu-.
        A zero variance (a degenerate fit with no density) gives None in both variants.

    Returns:
        t* as a Python float, or None when it is undefined.
    """
    _check_variant(variant)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    mu_p, var_p, mu_n, var_n = (_as_float(v) for v in (mu_pos, var_pos, mu_neg, var_neg))
    if not all(math.isfinite(v) for v in (mu_p, var_p, mu_n, var_n)) or min(var_p, var_n) < 0:
        raise ValueError(f"need finite means and variances >= 0, got {(mu_p, var_p, mu_n, var_n)}")
    if var_p == 0.0 or var_n == 0.0:
        return None
    sd_p, sd_n = math.sqrt(var_p), math.sqrt(var_n)
    low = 1.0 / num_classes
    beta1 = var_p - var_n
    beta2 = 2.0 * (mu_p * var_n - mu_n * var_p)

    if variant == "official":
        beta3 = (
            var_p * mu_n**2 - var_n * mu_p**2 + 2.0 * var_p * var_n * math.log(sd_n / sd_p + 1e-8)
        )
        disc = beta2**2 - 4.0 * beta1 * beta3
        denominator = 2.0 * beta1 + 1e-10
        if not disc > 0.0 or denominator == 0.0:
            return None
        return min(max((math.sqrt(disc) - beta2) / denominator, low), 1.0)

    # ln(alpha s- / (beta s+)) with 1/alpha, 1/beta the masses of the fits inside [1/C, 1].
    log_ratio = (
        math.log(sd_n / sd_p)
        + _log_truncated_mass(mu_n, sd_n, low, 1.0)
        - _log_truncated_mass(mu_p, sd_p, low, 1.0)
    )
    beta3 = var_p * mu_n**2 - var_n * mu_p**2 + 2.0 * var_p * var_n * log_ratio
    if beta1 == 0.0:
        return -beta3 / beta2 if beta2 != 0.0 else None
    disc = beta2**2 - 4.0 * beta1 * beta3
    if disc < 0.0:
        return None
    root = math.sqrt(disc)
    return -2.0 * beta3 / (root + beta2) if beta2 > 0.0 else (root - beta2) / (2.0 * beta1)


def trade_off(
    mu_pos: float,
    var_pos: float,
    mu_neg: float,
    var_neg: float,
    threshold: float,
    num_classes: int,
) -> tuple[float, float]:
    """(E1, E2) of DAW Eq. 7-8 for the step f(p) = 1[p >= threshold] (Table 1, "Ours").

    E1 = beta [Phi((1-mu-)/s-) - Phi((t-mu-)/s-)]: the mass of the truncated negative fit
    above t, i.e. the share of wrong pseudo labels that are used.
    E2 = alpha [Phi((t-mu+)/s+) - Phi((1/C-mu+)/s+)] = 1 - alpha [Phi((1-mu+)/s+) -
    Phi((t-mu+)/s+)]: the mass of the truncated positive fit below t, i.e. the share of
    correct pseudo labels that are discarded. t is clamped to [1/C, 1]; the truncated fits
    are used for both variants (these are the paper's definitions). NaN for a zero variance.
    """
    if var_pos <= 0.0 or var_neg <= 0.0:
        return math.nan, math.nan
    low = 1.0 / num_classes
    t = min(max(threshold, low), 1.0)
    sd_p, sd_n = math.sqrt(var_pos), math.sqrt(var_neg)
    e1 = math.exp(
        _log_truncated_mass(mu_neg, sd_n, t, 1.0) - _log_truncated_mass(mu_neg, sd_n, low, 1.0)
    )
    e2 = math.exp(
        _log_truncated_mass(mu_pos, sd_p, low, t) - _log_truncated_mass(mu_pos, sd_p, low, 1.0)
    )
    return e1, e2


@dataclass
class DAWOptions(PolicyOptions):
    name: str = "daw"
    momentum: float = 0.99
    """EMA momentum of the Gaussian fits and the DA distributions (Eq. 6)."""
    align: bool = True
    """Distribution alignment (Eq. 12-13)."""
    weighting: bool = True
    """The optimal step threshold t* (Eq. 11); off leaves alignment alone (Table 4)."""
    variant: Literal["paper", "official"] = "paper"
    """Follow the paper's equations or reproduce the released code (see DAWeighting)."""

    def validate(self) -> None:
        super().validate()
        self.decay("momentum")


class DAWeighting(Policy):
    """DAW's pseudo-label policy: DA (Eq. 12-13) then the step at t* (Eq. 11).

    Per training step: ``update(labeled_probs, labels)`` refits the Gaussians from the
    labeled predictions and recomputes t*, then ``policy(unlabeled_probs, valid)`` aligns
    and thresholds. In this order t* comes from the current labeled batch and is used at
    once, as in the released code.

    Args:
        num_classes: C.
        momentum: m of the EMAs (Eq. 6, and of the DA distributions); Table 5 picks 0.99.
        align: distribution alignment (Eq. 12). Off: confidence and target are read from the
            raw probabilities.
        weighting: the optimal step f* at t* ("DAWF"). Off: weight 1 on every valid pixel,
            so that DA alone can be ablated (Table 4).
        variant: ``paper`` or ``official``, see the module docstring. Differences:

            * Eq. 5 fit. paper: per image mean of the set's confidences, averaged over the
              images that have at least one pixel of the set; variance likewise the mean over
              those images of the per-image mean squared deviation from that overall mean,
              made unbiased by the factor sum_i N_i / (sum_i N_i - 1) of Eq. 6; a set with
              fewer than 2 pixels leaves its EMA alone. official: pooled over all valid
              pixels, variance denominator n - 1 + 1e-8, fewer than 10 pixels leave it alone.
            * Initial fits: mean 1/C for both; variance 1.0 (paper) or 0.5 (official).
            * Initial t*: official 0.95. paper: the identical initial fits have no crossing
              (Eq. 11 is undefined), so t* starts at 1/C: every pseudo label is used until
              the fits separate (early in training t* stays near 1/C anyway).
            * DA statistic. paper: EMA of the mean predicted class distribution (the mean of
              the probabilities over valid pixels), uniform 1/C at first. official: per class
              c, EMA of the mean max-confidence of the pixels whose argmax is c (classes
              absent from the batch keep their value), 1/C at first.

        reduce: sums a tensor over processes. Applied to sufficient statistics (counts, sums
            and sums of squares of the fits; class sums and counts of DA) before any mean,
            so DDP processes hold identical state. The released code instead averages each
            process's means and variances (and never syncs its DA statistics); with one
            process both agree.

    The unlabeled DA statistic is updated inside ``__call__`` from the batch it is given,
    before that batch is aligned (the released code updates it first, too). To reproduce
    the released code, which also feeds the CutMix-source batch into it, call the policy
    once on the concatenation of the weak batch and the CutMix-source batch.
    """

    name = "daw"
    Options = DAWOptions
    summary = "1 if confidence >= t*, the crossing of Gaussians fitted to right and wrong labeled confidences; distribution alignment (DAW)"
    stateful = True

    def __init__(
        self,
        num_classes: int,
        momentum: float = 0.99,
        align: bool = True,
        weighting: bool = True,
        variant: str = "paper",
        reduce: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__(num_classes, reduce)
        _check_variant(variant)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.align = align
        self.weighting = weighting
        self.variant = variant
        official = variant == "official"
        self.mu_pos = self.mu_neg = 1.0 / num_classes
        self.var_pos = self.var_neg = _OFFICIAL_INIT_VAR if official else 1.0
        self.threshold = _OFFICIAL_INIT_THRESHOLD if official else 1.0 / num_classes
        self.p_labeled = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.p_unlabeled = self.p_labeled.clone()

    # -- statistics -----------------------------------------------------------------------

    @torch.no_grad()
    def update(self, probs: Tensor, labels: Tensor, features: Tensor | None = None) -> None:
        """Refit both Gaussians (Eq. 5-6) and t* (Eq. 11) from labeled predictions.

        probs [B,C,H,W] softmax of the model on labeled images; labels [B,H,W], 255 ignored;
        `features` is not used.
        Also updates the labeled DA distribution when `align`. One host sync (t* is a float).
        """
        self._check_probs(probs)
        if labels.shape != (probs.shape[0], *probs.shape[2:]):
            raise ValueError(f"labels must be [B,H,W] matching probs, got {tuple(labels.shape)}")
        self._follow(probs.device)
        probs = probs.float()
        valid = labels != IGNORE_INDEX
        confidence, prediction = probs.max(dim=1)
        correct = prediction == labels
        members = torch.stack((valid & correct, valid & ~correct)).to(torch.float64)  # [2,B,H,W]
        # Deviations from the current EMA means (identical on every process) keep the sums of
        # squares free of cancellation when a fit is narrow.
        shift = torch.tensor([self.mu_pos, self.mu_neg], dtype=torch.float64, device=probs.device)
        deviation = (confidence.to(torch.float64) - shift.view(2, 1, 1, 1)) * members
        count = members.sum(dim=(2, 3))  # [2,B]
        total = deviation.sum(dim=(2, 3))
        squares = deviation.square().sum(dim=(2, 3))
        if self.variant == "paper":
            inverse = 1.0 / count.clamp(min=1.0)
            fits = torch.stack(
                (
                    (count > 0).sum(dim=1).to(torch.float64),
                    (total * inverse).sum(dim=1),
                    (squares * inverse).sum(dim=1),
                    count.sum(dim=1),
                ),
                dim=1,
            )
        else:
            fits = torch.stack((count.sum(dim=1), total.sum(dim=1), squares.sum(dim=1)), dim=1)
        packed = fits.flatten()
        if self.align:
            packed = torch.cat(
                (packed, self._class_statistics(probs, confidence, prediction, valid))
            )
        packed = self.reduce(packed)
        if self.align:
            self.p_labeled = self._ema_distribution(self.p_labeled, packed[fits.numel() :])
        pos, neg = packed[: fits.numel()].view(2, -1).tolist()
        self.mu_pos, self.var_pos = self._ema_fit(self.mu_pos, self.var_pos, pos)
        self.mu_neg, self.var_neg = self._ema_fit(self.mu_neg, self.var_neg, neg)
        threshold = optimal_threshold(
            self.mu_pos, self.var_pos, self.mu_neg, self.var_neg, self.num_classes, self.variant
        )
        if threshold is not None:
            self.threshold = threshold

    def _ema_fit(self, mu: float, var: float, stats: list[float]) -> tuple[float, float]:
        """EMA step (Eq. 6) of one fit from its reduced statistics (deviations from `mu`)."""
        m = self.momentum
        if self.variant == "paper":
            images, mean_total, mean_squares, pixels = stats
            if pixels < _MIN_PIXELS["paper"]:
                return mu, var
            offset = mean_total / images  # Eq. 5: average over images of per-image means
            batch_var = max(mean_squares / images - offset**2, 0.0) * pixels / (pixels - 1.0)
        else:
            pixels, total, squares = stats
            if pixels < _MIN_PIXELS["official"]:
                return mu, var
            offset = total / pixels
            batch_var = max(squares - total * offset, 0.0) / (pixels - 1.0 + 1e-8)
        return m * mu + (1.0 - m) * (mu + offset), m * var + (1.0 - m) * batch_var

    def _class_statistics(
        self, probs: Tensor, confidence: Tensor, prediction: Tensor, valid: Tensor
    ) -> Tensor:
        """[2C] float64: per-class sums and counts behind one DA expectation (Eq. 12)."""
        c = self.num_classes
        if self.variant == "paper":
            sums = (probs * valid.unsqueeze(1)).sum(dim=(0, 2, 3)).to(torch.float64)
            counts = valid.sum().to(torch.float64).expand(c)
        else:
            index = prediction.flatten()
            mask = valid.flatten().to(torch.float64)
            zeros = torch.zeros(c, dtype=torch.float64, device=probs.device)
            sums = zeros.index_add(0, index, confidence.flatten().to(torch.float64) * mask)
            counts = zeros.index_add(0, index, mask)
        return torch.cat((sums, counts))

    def _ema_distribution(self, current: Tensor, stats: Tensor) -> Tensor:
        sums, counts = stats.view(2, self.num_classes)
        batch = sums / counts.clamp(min=1.0)
        m = self.momentum
        # A class with no pixels (official) or a batch with none (paper) keeps its value;
        # torch.where instead of a branch keeps this on the device without a sync.
        return torch.where(counts > 0, m * current + (1.0 - m) * batch, current)

    def _follow(self, device: torch.device) -> None:
        # The DA vectors live where the probabilities are, so alignment never copies.
        if self.p_labeled.device != device:
            self.p_labeled = self.p_labeled.to(device)
            self.p_unlabeled = self.p_unlabeled.to(device)

    # -- pseudo labels --------------------------------------------------------------------

    def align_ratio(self) -> Tensor:
        """[C] float64 factor of Eq. 12: labeled over unlabeled expected class distribution."""
        # Only with momentum 0 can a class's unlabeled expectation be exactly 0; the floor
        # turns its ratio into a large finite number instead of inf * 0 = NaN.
        return self.p_labeled / self.p_unlabeled.clamp(min=1e-12)

    def aligned(self, probs: Tensor) -> Tensor:
        """DA(probs) of Eq. 12 with the current statistics (which it does not update).

        probs [B,C,H,W] -> [B,C,H,W] in probs' dtype (at least float32), rows summing to 1.
        """
        self._check_probs(probs)
        self._follow(probs.device)
        probs = probs if probs.dtype == torch.float64 else probs.float()
        scaled = probs * self.align_ratio().to(probs.dtype).view(1, -1, 1, 1)
        return scaled / scaled.sum(dim=1, keepdim=True)

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._follow(probs.device)
        if self.align:
            confidence, prediction = probs.max(dim=1)
            stats = self.reduce(self._class_statistics(probs, confidence, prediction, valid))
            self.p_unlabeled = self._ema_distribution(self.p_unlabeled, stats)
            probs = self.aligned(probs)
        confidence, target = probs.max(dim=1)  # Eq. 13: from the aligned probabilities
        if self.weighting:
            weight = (confidence >= self.threshold).float()
        else:
            weight = torch.ones_like(confidence)
        return confidence, target, weight

    # -- bookkeeping ----------------------------------------------------------------------

    def diagnostics(self) -> dict[str, float]:
        """t*, both fits, E1/E2 (see `trade_off`) and, with `align`, the DA ratio's range."""
        e1, e2 = trade_off(
            self.mu_pos, self.var_pos, self.mu_neg, self.var_neg, self.threshold, self.num_classes
        )
        out = {
            "t": self.threshold,
            "mu_pos": self.mu_pos,
            "sigma_pos": math.sqrt(self.var_pos),
            "mu_neg": self.mu_neg,
            "sigma_neg": math.sqrt(self.var_neg),
            "E1": e1,
            "E2": e2,
        }
        if self.align:
            low, high = torch.aminmax(self.align_ratio())
            out["da_ratio_min"], out["da_ratio_max"] = float(low), float(high)
        return out

    _STATE_SCALARS = ("mu_pos", "var_pos", "mu_neg", "var_neg", "threshold")

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "variant": self.variant}
        state.update({key: getattr(self, key) for key in self._STATE_SCALARS})
        state["p_labeled"] = self.p_labeled.clone()
        state["p_unlabeled"] = self.p_unlabeled.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("variant", *self._STATE_SCALARS, "p_labeled", "p_unlabeled"))
        if state["variant"] != self.variant:
            raise ValueError(
                f"state of variant {state['variant']!r} given to variant {self.variant!r}"
            )
        for key in ("p_labeled", "p_unlabeled"):
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != (self.num_classes,):
                raise ValueError(f"{key} must be a tensor of shape ({self.num_classes},)")
        for key in self._STATE_SCALARS:
            setattr(self, key, float(state[key]))
        self.p_labeled = state["p_labeled"].detach().clone().to(torch.float64)
        self.p_unlabeled = state["p_unlabeled"].detach().clone().to(torch.float64)
        self._follow(self.p_labeled.device)
