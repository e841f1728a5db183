"""FixMatch for segmentation, as in UniMatch's baseline: the weak view labels one strong view with CutMix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semiseg.schemes.base import EvalEMAOptions, StepOutput, Views
from semiseg.schemes.semi import LossScaleOptions, SemiOptions, SemiScheme, paste


@dataclass
class FixMatchOptions(SemiOptions, EvalEMAOptions, LossScaleOptions):
    name: str = "fixmatch"


class FixMatchScheme(SemiScheme):
    """loss = loss_scale * (CE(labeled) + L_u(strong view 1 with CutMix)); loss_scale 0.5 is
    UniMatch's fixmatch.py, 1.0 FixMatch's paper.

    The student's own detached weak-view prediction is the teacher; the CutMix source is
    predicted in eval mode, as in UniMatch.
    """

    name = "fixmatch"
    Options = FixMatchOptions
    summary = (
        "the weak view labels a strong view with CutMix; loss_scale * (L_x + L_u), 0.5 by default"
    )
    views = Views(strong=1, boxes=1)

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        model, teaching = self.models["student"], self.teaching
        u, x, y = unlabeled, labeled["image"], labeled["mask"]
        out_mix = self.eval_prediction(model, mix["image"])
        n = x.shape[0]
        out = model(torch.cat([x, u["image"]]))
        strong = paste(u["strong1"], mix["strong1"], u["box1"])
        out_s = model(strong)
        teaching.observe(out.rows(slice(None, n)), y)
        pl, pl_mix = teaching.label(out.rows(slice(n, None)), u, out_mix, mix)
        loss_x = self.labeled_loss(out.logits[:n], y)
        loss_s, logs = teaching.cutmix_loss(
            out_s.logits,
            pl,
            pl_mix,
            u["valid"],
            mix["valid"],
            u["box1"],
            u.get("oracle_mask"),
            features=out_s.features,
        )
        loss_s = teaching.combine({"loss_s": loss_s})["loss_s"]
        logs.update({"loss_x": loss_x.detach(), "loss_s": loss_s.detach()})
        logs.update(teaching.diagnostics(pl, u["valid"], u.get("oracle_mask")))
        return StepOutput(self.options.loss_scale * (loss_x + loss_s), logs)
