"""Offline self-training (DARS Eq. 2): labeled crops plus crops with offline pseudo labels.

One round is this scheme with `data.pseudo_labeled` (written before the round by
`semiseg pseudo-label`; ignored pixels are 255): the `unlabeled` batch holds those images
with their pseudo masks, augmented like the labeled ones. Without that list, `semiseg
train` runs every round (`semiseg.offline.rounds`): round 0 on labeled images, then per
round the previous model labels the unlabeled set with the generator of these options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from semiseg.options import OptionError
from semiseg.schemes.base import AuxOptions, EvalEMAOptions, Scheme, SchemeOptions, StepOutput
from semiseg.schemes.supervised import supervised_loss


@dataclass
class SelfTrainingOptions(SchemeOptions, EvalEMAOptions, AuxOptions):
    name: str = "self_training"
    method: Literal["st", "cbst", "da", "dars"] = "dars"
    """Pseudo-label generator (semiseg.pseudo.dars); DA+TS is `da` with `temperature` 1.27."""
    alpha: list[float] = field(default_factory=lambda: [0.2])
    """Labeling ratio of each round after round 0; its length is the number of such rounds."""
    beta_min: list[float] = field(default_factory=lambda: [0.0])
    """Per round, the random-scale range's lower bound becomes (1 - beta_min) * min (Sec. 3.3)."""
    beta_max: list[float] = field(default_factory=lambda: [0.0])
    """Per round, the upper bound becomes (1 + beta_max) * max."""
    threshold: float | None = None
    """ST with one confidence threshold instead of a labeling ratio."""
    temperature: float = 1.0
    """Teacher logits are divided by it before the softmax (temperature scaling, TS)."""
    flip: bool = True
    """Average the teacher's logits over a horizontal flip (the released DARS code does)."""
    variant: Literal["paper", "official"] = "paper"
    """'official': the released code's CBST (+1 pixel), per-image DARS sampling, float16 softmax."""
    continue_schedule: bool = False
    """Round k's poly schedule goes on where round k-1's would have left it (the released
    code's epoch counter); off: every round starts the schedule afresh."""
    teacher_size: int | None = None
    """The teacher predicts the unlabeled images with their longer side resized to this
    before its sliding windows (the released Cityscapes crop-361 generators: 1024); None:
    at the evaluation settings of the teacher's run."""

    def validate(self) -> None:
        super().validate()
        if not (len(self.alpha) == len(self.beta_min) == len(self.beta_max)):
            raise OptionError(
                "alpha",
                f"needs one value per round, as beta_min and beta_max do; got {len(self.alpha)}, "
                f"{len(self.beta_min)} and {len(self.beta_max)} values",
            )
        for key in ("alpha", "beta_min", "beta_max"):
            self.require(
                all(0.0 <= v <= 1.0 for v in getattr(self, key)), key, "values must be in [0, 1]"
            )
        self.require(
            self.method != "st" or self.threshold is None or 0 < self.threshold <= 1,
            "threshold",
            "must be in (0, 1]",
        )
        self.positive("temperature")


class SelfTrainingScheme(Scheme):
    """loss = CE(labeled) + CE(pseudo-labeled), each with the auxiliary head's loss (PSPNet)
    at `scheme.aux_weight`, as in the released DARS code; both batches share one forward
    pass, so BatchNorm sees them together."""

    name = "self_training"
    Options = SelfTrainingOptions
    summary = "offline rounds: the previous model labels the unlabeled set (ST, CBST, DA, DARS), the next learns from it"
    uses_pseudo_labels = True
    trains_aux = True

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        assert unlabeled is not None
        n = labeled["image"].shape[0]
        out = self.models["student"](torch.cat([labeled["image"], unlabeled["image"]]))
        weight = self.options.aux_weight
        parts = [
            supervised_loss(
                out.rows(slice(None, n)), labeled["mask"], weight, "x", self.labeled_loss
            ),
            supervised_loss(out.rows(slice(n, None)), unlabeled["mask"], weight, "p"),
        ]
        return StepOutput(parts[0].loss + parts[1].loss, {**parts[0].logs, **parts[1].logs})
