"""Supervised-only training on the labeled subset: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from semiseg.losses import LabeledLoss, cross_entropy
from semiseg.models.segmentor import SegmentationOutput
from semiseg.schemes.base import AuxOptions, EvalEMAOptions, Scheme, SchemeOptions, StepOutput


def supervised_loss(
    out: SegmentationOutput,
    mask: Tensor,
    aux_weight: float,
    suffix: str = "x",
    main: LabeledLoss | None = None,
) -> StepOutput:
    """The labeled loss `main` (cross-entropy by default) of the logits against `mask`, plus
    `aux_weight` x CE of the auxiliary head (PSPNet)."""
    loss_main = main(out.logits, mask) if main is not None else cross_entropy(out.logits, mask)
    loss = loss_main
    logs = {f"loss_{suffix}": loss_main.detach()}
    if out.aux is not None:
        loss_aux = cross_entropy(out.aux, mask)
        loss = loss + aux_weight * loss_aux
        logs[f"loss_aux_{suffix}"] = loss_aux.detach()
    return StepOutput(loss, logs)


@dataclass
class SupervisedOptions(SchemeOptions, EvalEMAOptions, AuxOptions):
    name: str = "supervised"


class SupervisedScheme(Scheme):
    """Cross-entropy on labeled crops (plus the auxiliary head's loss for models that have one)."""

    name = "supervised"
    Options = SupervisedOptions
    summary = "labeled images only: cross-entropy (plus PSPNet's auxiliary head)"
    trains_aux = True

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        out = self.models["student"](labeled["image"])
        return supervised_loss(
            out, labeled["mask"], self.options.aux_weight, main=self.labeled_loss
        )
