"""Supervised-only training on the labeled subset: the baseline every method must beat."""

from __future__ import annotations

from semiseg.losses import cross_entropy
from semiseg.schemes.base import Scheme, StepOutput


class SupervisedScheme(Scheme):
    """Cross-entropy on labeled crops (plus the auxiliary head's loss for models that have one)."""

    def training_step(self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int) -> StepOutput:
        out = self.models["student"](labeled["image"])
        loss_main = cross_entropy(out.logits, labeled["mask"])
        loss = loss_main
        logs = {"loss_x": loss_main.detach()}
        if out.aux is not None:
            loss_aux = cross_entropy(out.aux, labeled["mask"])
            loss = loss + self.cfg.scheme.aux_weight * loss_aux
            logs["loss_aux"] = loss_aux.detach()
        return StepOutput(loss, logs)
