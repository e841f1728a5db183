"""FixMatch for segmentation, as in UniMatch's baseline: the weak view labels one strong view with CutMix."""

from __future__ import annotations

import torch

from semiseg.losses import cross_entropy
from semiseg.schemes.base import StepOutput
from semiseg.schemes.semi import SemiScheme, detection_masks, paste, softmax


class FixMatchScheme(SemiScheme):
    """loss = (CE(labeled) + L_u(strong view 1 with CutMix)) / 2 (UniMatch's fixmatch.py).

    The student's own detached weak-view prediction is the teacher; the CutMix source is
    predicted in eval mode, as in UniMatch.
    """

    def training_step(self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int) -> StepOutput:
        assert unlabeled is not None and mix is not None
        model = self.models["student"]
        x, y = labeled["image"], labeled["mask"]
        with torch.no_grad():
            model.eval()
            out_mix = model(mix["image"])
            model.train()
        sizes = [x.shape[0], unlabeled["image"].shape[0]]
        out = model(torch.cat([x, unlabeled["image"]]))
        logits_x, logits_w = out.logits.split(sizes)
        features_x, features_w = out.features.detach().split(sizes)
        strong = paste(unlabeled["strong1"], mix["strong1"], unlabeled["box1"])
        logits_s = model(strong).logits
        self.policy.update(softmax(logits_x), y, features_x)
        pl, pl_mix = self.label(
            softmax(logits_w),
            unlabeled["valid"],
            softmax(out_mix.logits),
            mix["valid"],
            features=(features_w, out_mix.features),
            detections=detection_masks(unlabeled, mix),
        )
        loss_x = cross_entropy(logits_x, y)
        loss_s, logs = self.cutmix_loss(
            logits_s, pl, pl_mix, unlabeled["valid"], mix["valid"], unlabeled["box1"], unlabeled.get("oracle_mask")
        )
        logs.update({"loss_x": loss_x.detach(), "loss_s": loss_s.detach()})
        logs.update(self.diagnostics(pl, unlabeled["valid"], unlabeled.get("oracle_mask")))
        return StepOutput((loss_x + loss_s) / 2, logs)
