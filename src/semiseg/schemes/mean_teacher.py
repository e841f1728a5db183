"""Mean teacher (Tarvainen & Valpola, 2017) for segmentation: an EMA teacher labels the student's strong view."""

from __future__ import annotations

import copy

import torch
from torch import nn

from semiseg.config import Config
from semiseg.losses import cross_entropy
from semiseg.pseudo import Policy
from semiseg.schemes.base import StepOutput, unwrap
from semiseg.schemes.semi import SemiScheme, paste, softmax


class MeanTeacherScheme(SemiScheme):
    """loss = CE(labeled) + unsup_weight * L_u(student on strong view 1 with CutMix).

    The teacher is an EMA of the student (decay `scheme.teacher_decay`, warmed up as
    min(1 - 1/(step+1), decay)) that predicts the weak views in eval mode; it is also the
    network evaluated and saved, as is usual for mean teacher.
    """

    def __init__(
        self, cfg: Config, models: dict[str, nn.Module], num_classes: int, policy: Policy | None
    ):
        super().__init__(cfg, models, num_classes, policy)
        self.teacher = copy.deepcopy(unwrap(models["student"])).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        u = unlabeled
        with torch.no_grad():
            probs_w, probs_mix = softmax(
                self.teacher(torch.cat([u["image"], mix["image"]])).logits
            ).chunk(2)
        x, y = labeled["image"], labeled["mask"]
        strong = paste(u["strong1"], mix["strong1"], u["box1"])
        logits_x, logits_s = self.models["student"](torch.cat([x, strong])).logits.split(
            [x.shape[0], strong.shape[0]]
        )
        self.policy.update(softmax(logits_x), y)
        pl, pl_mix = self.label(probs_w, u["valid"], probs_mix, mix["valid"])
        loss_x = cross_entropy(logits_x, y)
        loss_u, logs = self.cutmix_loss(
            logits_s, pl, pl_mix, u["valid"], mix["valid"], u["box1"], u.get("oracle_mask")
        )
        logs.update({"loss_x": loss_x.detach(), "loss_u": loss_u.detach()})
        logs.update(self.diagnostics(pl, u["valid"], u.get("oracle_mask")))
        return StepOutput(loss_x + self.cfg.scheme.unsup_weight * loss_u, logs)

    @torch.no_grad()
    def after_optimizer_step(self, iteration: int) -> None:
        super().after_optimizer_step(iteration)
        decay = min(1 - 1 / (iteration + 1), self.cfg.scheme.teacher_decay)
        student = unwrap(self.models["student"])
        for t, s in zip(self.teacher.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - decay)
        for t, s in zip(self.teacher.buffers(), student.buffers(), strict=True):
            t.copy_(s)

    def eval_model(self) -> nn.Module:
        return self.teacher

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
