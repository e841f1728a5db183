"""Mean teacher (Tarvainen & Valpola, 2017) for segmentation: an EMA teacher labels the student's strong view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from semiseg.models.ema import ModelEMA
from semiseg.schemes.base import StepOutput, Views, unwrap
from semiseg.schemes.semi import (
    SemiOptions,
    SemiScheme,
    TeacherDecayOptions,
    UnsupervisedWeightOptions,
    paste,
)
from semiseg.schemes.teaching import Teaching


@dataclass
class MeanTeacherOptions(SemiOptions, UnsupervisedWeightOptions, TeacherDecayOptions):
    name: str = "mean_teacher"


class MeanTeacherScheme(SemiScheme):
    """loss = CE(labeled) + unsup_weight * L_u(student on strong view 1 with CutMix).

    The teacher is an EMA of the student (decay `scheme.teacher_decay`, warmed up as
    min(1 - 1/(step+1), decay)) that predicts the weak views in eval mode; it is also the
    network evaluated and saved, as is usual for mean teacher.
    """

    name = "mean_teacher"
    Options = MeanTeacherOptions
    summary = "an EMA teacher (`scheme.teacher_decay`) labels the student's strong view with CutMix; the teacher is evaluated"
    views = Views(strong=1, boxes=1)

    def __init__(
        self,
        cfg: Any,
        models: dict[str, nn.Module],
        num_classes: int,
        teaching: Teaching | None = None,
    ):
        super().__init__(cfg, models, num_classes, teaching)
        self.teacher = ModelEMA(unwrap(models["student"]), self.options.teacher_decay)

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        u, teaching = unlabeled, self.teaching
        n_u = u["image"].shape[0]
        with torch.no_grad():
            teacher_out = self.teacher.module(torch.cat([u["image"], mix["image"]]))
        x, y = labeled["image"], labeled["mask"]
        strong = paste(u["strong1"], mix["strong1"], u["box1"])
        out = self.models["student"](torch.cat([x, strong]))
        n = x.shape[0]
        logits_x, logits_s = out.logits[:n], out.logits[n:]
        teaching.observe(out.rows(slice(None, n)), y)
        pl, pl_mix = teaching.label(
            teacher_out.rows(slice(None, n_u)), u, teacher_out.rows(slice(n_u, None)), mix
        )
        loss_x = self.labeled_loss(logits_x, y)
        loss_u, logs = teaching.cutmix_loss(
            logits_s,
            pl,
            pl_mix,
            u["valid"],
            mix["valid"],
            u["box1"],
            u.get("oracle_mask"),
            features=out.features[n:],
        )
        loss_u = teaching.combine({"loss_u": loss_u})["loss_u"]
        logs.update({"loss_x": loss_x.detach(), "loss_u": loss_u.detach()})
        logs.update(teaching.diagnostics(pl, u["valid"], u.get("oracle_mask")))
        return StepOutput(loss_x + self.options.unsup_weight * loss_u, logs)

    def after_optimizer_step(self, iteration: int) -> None:
        super().after_optimizer_step(iteration)
        self.teacher.update(self.models["student"], iteration)

    def eval_model(self) -> nn.Module:
        return self.teacher.module

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
