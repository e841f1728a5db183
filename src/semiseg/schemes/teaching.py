"""The one teaching path of every semi-supervised scheme: teacher outputs -> policy ->
unlabeled loss -> the student's loss and its diagnostics.

`Teaching` holds the run's policy and unlabeled loss. Every scheme gets its pseudo labels
through `label`, which always hands the policy the teacher's probabilities, its features
and, where the data has them, the detector boxes of the images; the loss then adds what it
needs of the teacher (`UnlabeledLoss.teach`). Every unlabeled term goes through `loss` (or
`cutmix_loss` for a pasted view), so any policy and any loss work under any scheme.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.models.segmentor import SegmentationOutput
from semiseg.pseudo import LOSSES, POLICIES, Policy, PolicyContext, PseudoLabels, UnlabeledLoss
from semiseg.pseudo.base import paste


def softmax(logits: Tensor) -> Tensor:
    """Teacher probabilities: no gradient, float32 whatever the autocast dtype."""
    return logits.detach().float().softmax(dim=1)


class Teaching:
    """A policy and an unlabeled loss, and the calls every scheme makes of them."""

    def __init__(self, policy: Policy, loss: UnlabeledLoss):
        self.policy = policy
        self.loss = loss

    @classmethod
    def from_config(
        cls, cfg: Any, num_classes: int, context: PolicyContext | None = None
    ) -> Teaching:
        """The `policy:` and `loss:` sections of `cfg`, built through their registries."""
        policy = POLICIES.get(cfg.policy.name).from_options(cfg.policy, num_classes, context)
        return cls(policy, LOSSES.get(cfg.loss.name).from_options(cfg.loss))

    def observe(self, out: SegmentationOutput, mask: Tensor) -> None:
        """The policy's statistics from the student's (or teacher's) outputs on labeled
        images with their masks [B,H,W]."""
        self.policy.update(softmax(out.logits), mask, out.features.detach())

    def label(
        self,
        weak: SegmentationOutput,
        unlabeled: dict,
        mix_out: SegmentationOutput | None = None,
        mix: dict | None = None,
    ) -> tuple[PseudoLabels, PseudoLabels | None]:
        """Pseudo labels of the weak views of the unlabeled batch and of its CutMix source
        (None without one), from the teacher's outputs on each: one policy call on both at
        once, so a policy's statistics (DAW's alignment) see both, as in the released code."""
        outs, batches = [weak], [unlabeled]
        if mix_out is not None and mix is not None:
            outs.append(mix_out)
            batches.append(mix)
        probs = torch.cat([softmax(out.logits) for out in outs])
        detections = None
        if all("detections" in batch for batch in batches):
            detections = torch.cat([batch["detections"] for batch in batches])
        labels = self.policy(
            probs,
            torch.cat([batch["valid"] for batch in batches]),
            features=torch.cat([out.features.detach() for out in outs]),
            detections=detections,
        )
        labels = self.loss.teach(probs, labels)
        n = weak.logits.shape[0]
        if len(outs) == 1:
            return labels, None
        return labels.rows(slice(None, n)), labels.rows(slice(n, None))

    def cutmix_loss(
        self,
        logits: Tensor,
        pl: PseudoLabels,
        pl_mix: PseudoLabels,
        valid: Tensor,
        valid_mix: Tensor,
        box: Tensor,
        oracle: Tensor | None = None,
        features: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Unlabeled loss of a CutMix view: targets, weights and valid pixels pasted with `box`;
        with `oracle` (the unlabeled batch's ground truth, under `scheme.oracle_eval`) also
        the loss's oracle diagnostics on the pixels outside the box (the pasted source batch
        has no ground truth). `features`: the student's features on the view, for a policy
        that learns from them (`learn_from_student`)."""
        target = pl.pasted(pl_mix, box)
        valid_view = paste(valid, valid_mix, box)
        if features is not None:
            self.learn_from_student(features, target, valid_view)
        logs: dict[str, Tensor | float] = {}
        if oracle is not None:
            logs = self.loss.oracle_diagnostics(
                logits.detach(), target, oracle.masked_fill(box | ~valid_view, IGNORE_INDEX)
            )
        return self.loss(logits, target, valid_view), logs

    def learn_from_student(self, features: Tensor, pl: PseudoLabels, valid: Tensor) -> None:
        """The policy's statistics from the student's features on a view with its labels."""
        self.policy.learn_from_student(features.detach(), pl, valid)

    def combine(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """A step's unlabeled terms, as the loss combines them (FPL's joint rescaling)."""
        return self.loss.combine(terms)

    def diagnostics(
        self, pl: PseudoLabels, valid: Tensor, oracle: Tensor | None
    ) -> dict[str, Tensor | float]:
        """Fraction of valid pixels used, their mean weight and confidence, the policy's and
        the loss's own scalars and, under oracle_eval, the pseudo labels' quality
        (`oracle_diagnostics`)."""
        valid_f = valid.float()
        n_valid = valid_f.sum().clamp(min=1)
        used = (pl.weight > 0) & valid
        logs: dict[str, Tensor | float] = {
            "mask_ratio": used.float().sum() / n_valid,
            "mean_weight": (pl.weight * valid_f).sum() / n_valid,
            "mean_confidence": (pl.confidence * valid_f).sum() / n_valid,
        }
        logs.update({f"policy/{k}": v for k, v in self.policy.diagnostics().items()})
        logs.update(self.loss.diagnostics(pl, valid))
        if oracle is not None:
            logs.update(oracle_diagnostics(pl, valid, oracle))
        return logs

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)


def oracle_diagnostics(
    pl: PseudoLabels, valid: Tensor, oracle: Tensor
) -> dict[str, Tensor | float]:
    """Pseudo-label quality against ground truth that training never sees, on valid pixels
    with a known class: accuracy of used (weight > 0) and of discarded labels, the
    weight-averaged accuracy sum(w [right]) / sum(w) (what the loss actually sees; equal to
    the used accuracy for 0/1 weights), and the mean weight of right and of wrong used
    labels (how well a soft weight, such as rank weighting's, separates them). NaN marks
    "no such pixels in this batch" (the logger keeps it out of TensorBoard)."""
    known = valid & (oracle != IGNORE_INDEX)
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
