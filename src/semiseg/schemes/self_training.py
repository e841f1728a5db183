"""One round of offline self-training (DARS Eq. 2): labeled crops plus pseudo-labeled crops.

The pseudo labels were written before the round by `semiseg pseudo-label` (ignored pixels
are 255); the `unlabeled` batch holds those images with their pseudo masks, augmented like
the labeled ones. The multi-round loop around it is `semiseg.selftrain`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from semiseg.schemes.base import Scheme, StepOutput
from semiseg.schemes.supervised import supervised_loss


class SelfTrainingScheme(Scheme):
    """loss = CE(labeled) + CE(pseudo-labeled), each with the auxiliary head's loss (PSPNet)
    at `scheme.aux_weight`, as in the released DARS code; both batches share one forward
    pass, so BatchNorm sees them together."""

    uses_pseudo_labels: ClassVar[bool] = True

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None
        n = labeled["image"].shape[0]
        out = self.models["student"](torch.cat([labeled["image"], unlabeled["image"]]))
        parts = [
            supervised_loss(
                out.rows(slice(None, n)), labeled["mask"], self.cfg.scheme.aux_weight, "x"
            ),
            supervised_loss(
                out.rows(slice(n, None)), unlabeled["mask"], self.cfg.scheme.aux_weight, "p"
            ),
        ]
        return StepOutput(parts[0].loss + parts[1].loss, {**parts[0].logs, **parts[1].logs})
