"""FixMatch for segmentation, as in UniMatch's baseline: the weak view labels one strong view with CutMix."""

from __future__ import annotations

import torch

from semiseg.losses import cross_entropy
from semiseg.schemes.base import StepOutput
from semiseg.schemes.semi import SemiScheme, paste


class FixMatchScheme(SemiScheme):
    """loss = (CE(labeled) + L_u(strong view 1 with CutMix)) / 2 (UniMatch's fixmatch.py).

    The student's own detached weak-view prediction is the teacher; the CutMix source is
    predicted in eval mode, as in UniMatch.
    """

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None and mix is not None
        model = self.models["student"]
        x, y = labeled["image"], labeled["mask"]
        with torch.no_grad():
            model.eval()
            out_mix = model(mix["image"])
            model.train()
        n = x.shape[0]
        out = model(torch.cat([x, unlabeled["image"]]))
        strong = paste(unlabeled["strong1"], mix["strong1"], unlabeled["box1"])
        logits_s = model(strong).logits
        pl, pl_mix = self.teach(
            labeled, out.rows(slice(None, n)), out.rows(slice(n, None)), unlabeled, mix, out_mix
        )
        loss_x = cross_entropy(out.logits[:n], y)
        loss_s, logs = self.cutmix_loss(
            logits_s,
            pl,
            pl_mix,
            unlabeled["valid"],
            mix["valid"],
            unlabeled["box1"],
            unlabeled.get("oracle_mask"),
        )
        logs.update({"loss_x": loss_x.detach(), "loss_s": loss_s.detach()})
        logs.update(self.diagnostics(pl, unlabeled["valid"], unlabeled.get("oracle_mask")))
        return StepOutput((loss_x + loss_s) / 2, logs)
