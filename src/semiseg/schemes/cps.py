"""Cross pseudo supervision (Chen et al., CVPR 2021): two differently initialised students teach each other.

FPL's baseline. Each network's prediction on the unlabeled images, through the policy,
is the other network's target.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from semiseg.losses import cross_entropy
from semiseg.schemes.base import StepOutput
from semiseg.schemes.semi import SemiScheme, paste, softmax


class CPSScheme(SemiScheme):
    """loss = CE_a(x) + CE_b(x) + unsup_weight * (L(a_u, pseudo(b)) + L(b_u, pseudo(a))).

    Both students see the weak unlabeled view with a CutMix box from the mix-source batch;
    the targets are the other student's predictions on the two source batches, mixed with
    the same box (CPS's CutMix variant). Teacher predictions are made without gradient in
    train mode, as in the CPS code. The first student is evaluated. The policy labels for
    both directions, so a stateful policy (DAW's alignment statistic) sees each unlabeled
    batch twice per step; its labeled statistics come from the first student.
    """

    model_names: ClassVar[tuple[str, ...]] = ("student", "student_b")

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        u = unlabeled
        x, y = labeled["image"], labeled["mask"]
        box = u["box1"]
        mixed_image = paste(u["image"], mix["image"], box)
        logits = {
            name: self.models[name](torch.cat([x, mixed_image])).logits.split(
                [x.shape[0], mixed_image.shape[0]]
            )
            for name in self.model_names
        }
        self.policy.update(softmax(logits["student"][0]), y)
        sources = torch.cat([u["image"], mix["image"]])
        labels, logs = {}, {}
        for name in self.model_names:
            with torch.no_grad():
                probs_u, probs_mix = softmax(self.models[name](sources).logits).chunk(2)
            labels[name] = self.label(probs_u, u["valid"], probs_mix, mix["valid"])
            if name == "student":
                logs.update(self.diagnostics(labels[name][0], u["valid"], u.get("oracle_mask")))
        losses = {}
        for name, other in zip(self.model_names, reversed(self.model_names), strict=True):
            logits_x, logits_u = logits[name]
            losses[f"loss_x_{name}"] = cross_entropy(logits_x, y)
            # The first student's scores stand for the pair, like its policy diagnostics.
            oracle = u.get("oracle_mask") if name == "student" else None
            losses[f"loss_u_{name}"], scores = self.cutmix_loss(
                logits_u, *labels[other], u["valid"], mix["valid"], box, oracle
            )
            logs.update(scores)
        total = sum(
            losses[f"loss_x_{n}"] + self.cfg.scheme.unsup_weight * losses[f"loss_u_{n}"]
            for n in self.model_names
        )
        logs.update({k: v.detach() for k, v in losses.items()})
        return StepOutput(total, logs)
