"""UniMatch (Yang et al., CVPR 2023): two strong views with CutMix plus a feature-perturbed stream.

The DAW paper's base scheme: DAW = UniMatch + the `daw` policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semiseg.schemes.base import EvalEMAOptions, StepOutput, Views
from semiseg.schemes.semi import LossScaleOptions, SemiOptions, SemiScheme, paste


@dataclass
class UniMatchOptions(SemiOptions, EvalEMAOptions, LossScaleOptions):
    name: str = "unimatch"


class UniMatchScheme(SemiScheme):
    """loss = loss_scale * (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp), UniMatch's fixed weights
    (loss_scale 0.5 is UniMatch's / 2; 1.0 is DAW's paper, L = L_s + L_u).

    The weak view is predicted together with the labeled batch (train-mode BatchNorm) and
    its feature-perturbed copy (Dropout2d(0.5) on encoder features) gives L_fp; both strong
    views get their own CutMix box from the independently drawn mix-source batch, whose
    prediction is made in eval mode. Pseudo labels and weights come from the policy.
    """

    name = "unimatch"
    Options = UniMatchOptions
    summary = "two strong views with CutMix + a feature-perturbed stream; loss_scale * (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp), 0.5 by default"
    views = Views(strong=2, boxes=2)

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        model, teaching = self.models["student"], self.teaching
        u, x, y = unlabeled, labeled["image"], labeled["mask"]
        out_mix = self.eval_prediction(model, mix["image"])
        n = x.shape[0]
        clean, perturbed = model(torch.cat([x, u["image"]]), perturb=True)
        logits_x = clean.logits[:n]
        logits_fp = perturbed.logits[n:]
        strong1 = paste(u["strong1"], mix["strong1"], u["box1"])
        strong2 = paste(u["strong2"], mix["strong2"], u["box2"])
        out_s = model(torch.cat([strong1, strong2]))
        logits_s1, logits_s2 = out_s.logits.chunk(2)
        features_s1, features_s2 = out_s.features.chunk(2)

        teaching.observe(clean.rows(slice(None, n)), y)
        pl, pl_mix = teaching.label(clean.rows(slice(n, None)), u, out_mix, mix)
        losses = {"loss_x": self.labeled_loss(logits_x, y)}
        losses["loss_s1"], logs = teaching.cutmix_loss(
            logits_s1,
            pl,
            pl_mix,
            u["valid"],
            mix["valid"],
            u["box1"],
            u.get("oracle_mask"),
            features=features_s1,
        )
        losses["loss_s2"], _ = teaching.cutmix_loss(
            logits_s2, pl, pl_mix, u["valid"], mix["valid"], u["box2"], features=features_s2
        )
        losses["loss_fp"] = teaching.loss(logits_fp, pl, u["valid"])
        losses.update(teaching.combine({k: losses[k] for k in ("loss_s1", "loss_s2", "loss_fp")}))
        loss = self.options.loss_scale * (
            losses["loss_x"]
            + 0.25 * losses["loss_s1"]
            + 0.25 * losses["loss_s2"]
            + 0.5 * losses["loss_fp"]
        )
        logs.update({k: v.detach() for k, v in losses.items()})
        logs.update(teaching.diagnostics(pl, u["valid"], u.get("oracle_mask")))
        return StepOutput(loss, logs)
