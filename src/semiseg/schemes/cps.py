"""Cross pseudo supervision (Chen et al., CVPR 2021): two differently initialised students teach each other.

FPL's baseline. Each network's prediction on the unlabeled images, through the policy,
is the other network's target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from semiseg.schemes.base import EvalEMAOptions, StepOutput, Views
from semiseg.schemes.semi import SemiOptions, SemiScheme, UnsupervisedWeightOptions, paste


@dataclass
class CPSOptions(SemiOptions, EvalEMAOptions, UnsupervisedWeightOptions):
    name: str = "cps"
    # CPS's own CutMix (TorchSemiSeg's BoxMaskGenerator, which the released CPS and FPL code
    # apply to every unlabeled image): 3 XOR-combined boxes covering 0.25-0.5 of the crop.
    cutmix_p: float = 1.0
    cutmix_boxes: int = 3
    cutmix_area: list[float] | None = field(default_factory=lambda: [0.25, 0.5])


class CPSScheme(SemiScheme):
    """loss = CE_a(x) + CE_b(x) + unsup_weight * (L(a_u, pseudo(b)) + L(b_u, pseudo(a))).

    Both students see the weak unlabeled view with CPS's CutMix boxes (the defaults:
    every view mixed, 3 XOR-combined boxes over 0.25-0.5 of the crop) from the mix-source batch;
    the targets are the other student's predictions on the two source batches, mixed with
    the same box. Teacher predictions are made without gradient in train mode, as in the
    CPS code. The first student is evaluated. The policy labels for both directions, so a
    stateful policy (DAW's alignment statistic) sees each unlabeled batch twice per step;
    its labeled statistics come from the first student.
    """

    name = "cps"
    Options = CPSOptions
    summary = "two differently initialised students label each other's CutMix view"
    model_names = ("student", "student_b")
    views = Views(strong=0, boxes=1)

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        u, teaching = unlabeled, self.teaching
        x, y = labeled["image"], labeled["mask"]
        n, n_u = x.shape[0], u["image"].shape[0]
        box = u["box1"]
        mixed_image = paste(u["image"], mix["image"], box)
        outs = {name: self.models[name](torch.cat([x, mixed_image])) for name in self.model_names}
        teaching.observe(outs["student"].rows(slice(None, n)), y)
        sources = torch.cat([u["image"], mix["image"]])
        labels, logs = {}, {}
        for name in self.model_names:
            with torch.no_grad():
                teacher = self.models[name](sources)
            labels[name] = teaching.label(
                teacher.rows(slice(None, n_u)), u, teacher.rows(slice(n_u, None)), mix
            )
            if name == "student":
                logs.update(teaching.diagnostics(labels[name][0], u["valid"], u.get("oracle_mask")))
        losses = {}
        for name, other in zip(self.model_names, reversed(self.model_names), strict=True):
            logits_x, logits_u = outs[name].logits[:n], outs[name].logits[n:]
            losses[f"loss_x_{name}"] = self.labeled_loss(logits_x, y)
            # The first student's scores stand for the pair, like its policy diagnostics.
            oracle = u.get("oracle_mask") if name == "student" else None
            losses[f"loss_u_{name}"], scores = teaching.cutmix_loss(
                logits_u,
                *labels[other],
                u["valid"],
                mix["valid"],
                box,
                oracle,
                features=outs[name].features[n:],
            )
            logs.update(scores)
        losses.update(
            teaching.combine({f"loss_u_{m}": losses[f"loss_u_{m}"] for m in self.model_names})
        )
        weight = self.options.unsup_weight
        total = sum(
            losses[f"loss_x_{m}"] + weight * losses[f"loss_u_{m}"] for m in self.model_names
        )
        logs.update({k: v.detach() for k, v in losses.items()})
        return StepOutput(total, logs)
