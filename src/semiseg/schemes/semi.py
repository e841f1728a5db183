"""What the semi-supervised schemes share: pseudo labels through a policy, CutMix, diagnostics.

Batches (see `semiseg.data.transforms.UnlabeledTransform`): `labeled` has image [B,3,h,w]
and mask [B,h,w]; `unlabeled` and `mix` (the CutMix-source batch, drawn independently as
in UniMatch) have the weak view `image`, strong views `strong1`/`strong2`, CutMix boxes
`box1`/`box2` and `valid` (False on padding), and `oracle_mask` only under
`scheme.oracle_eval`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from semiseg.config import Config
from semiseg.losses import fuzzy_positive_loss, weighted_cross_entropy
from semiseg.models.segmentor import SegmentationOutput
from semiseg.pseudo import Policy, PseudoLabels
from semiseg.pseudo.fpl import (
    adaptive_weight,
    fuzzy_positive_mask,
    gradient_score_cases,
    positive_gradient_score,
)
from semiseg.schemes.base import Scheme

FPL_K_BINS = 4
"""K histogram bins logged for FPL: K = 1, 2, 3 and >= 4 (the paper's Fig. 4a)."""


def paste(base: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """CutMix: `source` inside `box` [B,h,w], `base` elsewhere; works for [B,h,w] and [B,C,h,w]."""
    if base.dim() == 4:
        box = box[:, None]
    return torch.where(box, source, base)


class SemiScheme(Scheme):
    """Base of schemes that learn from unlabeled images through a pseudo-label policy."""

    uses_unlabeled: ClassVar[bool] = True

    def __init__(
        self, cfg: Config, models: dict[str, nn.Module], num_classes: int, policy: Policy | None
    ):
        super().__init__(cfg, models, num_classes, policy)
        if policy is None:
            raise ValueError(f"scheme {cfg.scheme.name!r} needs a pseudo-label policy")
        self.policy: Policy = policy

    def label(
        self,
        probs: Tensor,
        valid: Tensor,
        probs_mix: Tensor,
        valid_mix: Tensor,
        features: tuple[Tensor, Tensor] | None = None,
        detections: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[PseudoLabels, PseudoLabels]:
        """One policy call on the batch and its CutMix source, so statistics see both at once.

        `features` (teacher features of both batches) and `detections` (detector box bitmasks
        of both) are passed on to policies that use them (`rankweight`).

        With the FPL loss (`loss.name: fpl`) the pseudo labels also carry each pixel's fuzzy
        positive set, taken from the teacher's probabilities as they are (before any
        alignment a policy applies), and the policy's weight is multiplied by FPL's adaptive
        weight: DAW + FPL uses FPL only on the pixels DAW keeps.
        """
        probs_all = torch.cat([probs, probs_mix])
        both = self.policy(
            probs_all,
            torch.cat([valid, valid_mix]),
            features=torch.cat(features) if features is not None else None,
            detections=torch.cat(detections) if detections is not None else None,
        )
        loss_cfg = self.cfg.loss
        if loss_cfg.name == "fpl":
            positive = fuzzy_positive_mask(probs_all, loss_cfg.T, loss_cfg.variant)
            weight = both.weight
            if loss_cfg.adaptive_weight != "none":
                weight = weight * adaptive_weight(
                    probs_all, positive, loss_cfg.A, loss_cfg.adaptive_weight, loss_cfg.variant
                )
            both = PseudoLabels(both.target, weight, both.confidence, positive)
        n = probs.shape[0]
        return _rows(both, slice(None, n)), _rows(both, slice(n, None))

    def teach(
        self,
        labeled: dict,
        labeled_out: SegmentationOutput,
        weak_out: SegmentationOutput,
        unlabeled: dict,
        mix: dict,
        mix_out: SegmentationOutput,
    ) -> tuple[PseudoLabels, PseudoLabels]:
        """The policy's labeled update and its pseudo labels for the weak view and the CutMix
        source, from the network outputs on each (features and detections included, for
        policies that use them)."""
        self.policy.update(
            softmax(labeled_out.logits), labeled["mask"], labeled_out.features.detach()
        )
        return self.label(
            softmax(weak_out.logits),
            unlabeled["valid"],
            softmax(mix_out.logits),
            mix["valid"],
            features=(weak_out.features.detach(), mix_out.features),
            detections=detection_masks(unlabeled, mix),
        )

    @staticmethod
    def mixed(pl: PseudoLabels, pl_mix: PseudoLabels, box: Tensor) -> PseudoLabels:
        positive = None
        if pl.positive is not None and pl_mix.positive is not None:
            positive = paste(pl.positive, pl_mix.positive, box)
        return PseudoLabels(
            paste(pl.target, pl_mix.target, box),
            paste(pl.weight, pl_mix.weight, box),
            paste(pl.confidence, pl_mix.confidence, box),
            positive,
        )

    def unlabeled_loss(self, logits: Tensor, pl: PseudoLabels, valid: Tensor) -> Tensor:
        """sum(per-pixel loss * weight) / #valid pixels: cross-entropy with the pseudo label, or
        FPL's fuzzy positive loss (Eq. 7) when the pseudo labels carry positive sets."""
        weight = pl.weight * valid
        ce = weighted_cross_entropy(logits, pl.target, weight, valid)
        if pl.positive is None:
            return ce
        fpl = (fuzzy_positive_loss(logits, pl.positive) * weight).sum() / valid.sum().clamp(min=1)
        if self.cfg.loss.rescale:
            fpl = fpl * (ce.detach() / fpl.detach().clamp(min=1e-12))
        return fpl

    def cutmix_loss(
        self,
        logits: Tensor,
        pl: PseudoLabels,
        pl_mix: PseudoLabels,
        valid: Tensor,
        valid_mix: Tensor,
        box: Tensor,
        oracle: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Unlabeled loss of a CutMix view: targets, weights and valid pixels pasted with `box`.

        With `oracle` (the unlabeled batch's ground truth, under `scheme.oracle_eval`) and the
        FPL loss, also FPL's positive gradient scores on the pixels outside the box.
        """
        target = self.mixed(pl, pl_mix, box)
        valid_view = paste(valid, valid_mix, box)
        logs: dict[str, Tensor | float] = {}
        if oracle is not None and target.positive is not None:
            # The pasted source batch has no ground truth.
            logs = fpl_gradient_scores(
                logits.detach(), target, oracle.masked_fill(box | ~valid_view, 255)
            )
        return self.unlabeled_loss(logits, target, valid_view), logs

    def diagnostics(
        self, pl: PseudoLabels, valid: Tensor, oracle: Tensor | None
    ) -> dict[str, Tensor | float]:
        """Fraction of valid pixels used, their mean weight, the policy's own scalars and, under
        oracle_eval, the accuracy of used and of discarded pseudo labels, the weight-averaged
        accuracy (what the loss actually sees; equal to the used accuracy for 0/1 weights) and
        the mean weight of right and of wrong used pseudo labels (how well a soft weight, such
        as rank weighting's, separates them)."""
        valid_f = valid.float()
        n_valid = valid_f.sum().clamp(min=1)
        used = (pl.weight > 0) & valid
        logs: dict[str, Tensor | float] = {
            "mask_ratio": used.float().sum() / n_valid,
            "mean_weight": (pl.weight * valid_f).sum() / n_valid,
            "mean_confidence": (pl.confidence * valid_f).sum() / n_valid,
        }
        logs.update({f"policy/{k}": v for k, v in self.policy.diagnostics().items()})
        if pl.positive is not None:
            logs.update(fpl_k_histogram(pl.positive, valid))
        if oracle is not None:
            logs.update(oracle_diagnostics(pl, valid, oracle))
        return logs

    def state_dict(self) -> dict:
        return {**super().state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])


def oracle_diagnostics(
    pl: PseudoLabels, valid: Tensor, oracle: Tensor
) -> dict[str, Tensor | float]:
    """Pseudo-label quality against ground truth that training never sees, on valid pixels
    with a known class: accuracy of used (weight > 0) and of discarded labels, the
    weight-averaged accuracy sum(w [right]) / sum(w), and the mean weight of right and of
    wrong used labels. NaN marks "no such pixels in this batch" (the logger keeps it out of
    TensorBoard)."""
    known = valid & (oracle != 255)
    correct = pl.target == oracle
    used = (pl.weight > 0) & known

    def mean(values: Tensor, part: Tensor) -> Tensor | float:
        count = part.float().sum()
        return (values * part).sum() / count if count > 0 else float("nan")

    weight = pl.weight * known
    total = weight.sum()
    return {
        "oracle/acc_used": mean(correct.float(), used),
        "oracle/acc_discarded": mean(correct.float(), ~used & known),
        "oracle/acc_weighted": (weight * correct).sum() / total if total > 0 else float("nan"),
        "oracle/weight_correct": mean(pl.weight, used & correct),
        "oracle/weight_wrong": mean(pl.weight, used & ~correct),
    }


def _rows(pl: PseudoLabels, rows: slice) -> PseudoLabels:
    positive = pl.positive[rows] if pl.positive is not None else None
    return PseudoLabels(pl.target[rows], pl.weight[rows], pl.confidence[rows], positive)


def fpl_k_histogram(positive: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Share of valid pixels with K = 1, 2, 3 and >= 4 fuzzy positive classes, and the mean K."""
    k = positive.sum(dim=1)[valid]
    n = max(k.numel(), 1)
    logs = {f"fpl/k{j}": (k == j).sum() / n for j in range(1, FPL_K_BINS)}
    logs[f"fpl/k{FPL_K_BINS}+"] = (k >= FPL_K_BINS).sum() / n
    logs["fpl/mean_k"] = k.float().sum() / n
    return logs


def fpl_gradient_scores(
    logits: Tensor, pl: PseudoLabels, oracle: Tensor
) -> dict[str, Tensor | float]:
    """Mean positive gradient score R (Eq. 12) of FPL and of cross-entropy with the pseudo label
    (R^v), per case of Sec. 3.4 (1: pseudo label right, 2: wrong but the truth is in the set,
    3: the truth is outside it), with each case's share of the pixels that have ground truth."""
    assert pl.positive is not None
    case = gradient_score_cases(pl.target, pl.positive, oracle)
    r_fpl = positive_gradient_score(logits, pl.positive, oracle)
    one_hot = torch.zeros_like(pl.positive).scatter(
        1, pl.target.clamp(max=pl.positive.shape[1] - 1)[:, None], True
    )
    r_ce = positive_gradient_score(logits, one_hot, oracle)
    known = (case > 0).sum()
    logs: dict[str, Tensor | float] = {}
    for c in (1, 2, 3):
        part = case == c
        count = part.sum()
        logs[f"fpl/case{c}_share"] = count / known if known > 0 else float("nan")
        logs[f"fpl/R_case{c}"] = r_fpl[part].mean() if count > 0 else float("nan")
        logs[f"fpl/R_ce_case{c}"] = r_ce[part].mean() if count > 0 else float("nan")
    return logs


def detection_masks(unlabeled: dict, mix: dict) -> tuple[Tensor, Tensor] | None:
    """The detector box bitmasks of the batch and its CutMix source, when the data has them."""
    if "detections" not in unlabeled or "detections" not in mix:
        return None
    return unlabeled["detections"], mix["detections"]


def softmax(logits: Tensor) -> Tensor:
    return logits.detach().float().softmax(dim=1)
