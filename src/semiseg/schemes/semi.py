"""What the semi-supervised schemes share: their CutMix options and the teaching path.

Batches (see `semiseg.data.transforms.UnlabeledTransform`): `labeled` has image [B,3,h,w]
and mask [B,h,w]; `unlabeled` and `mix` (the CutMix-source batch, drawn independently) have
the weak view `image`, the strong views `strong1`/`strong2` and CutMix boxes `box1`/`box2`
the scheme's `views` ask for, `valid` (False on padding), `detections` where the policy
reads detector boxes, and `oracle_mask` only under `scheme.oracle_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from semiseg.models.segmentor import SegmentationOutput
from semiseg.pseudo.base import paste
from semiseg.schemes.base import Scheme, SchemeOptions
from semiseg.schemes.teaching import Teaching, oracle_diagnostics, softmax

__all__ = ["SemiOptions", "SemiScheme", "oracle_diagnostics", "paste", "softmax"]


@dataclass
class SemiOptions(SchemeOptions):
    """Options of every scheme that learns from unlabeled images."""

    cutmix_p: float = 0.5
    """Probability that a strong view gets a CutMix box from the mix-source batch."""
    cutmix_boxes: int = 1
    """CutMix boxes per strong view (their union is pasted); STPG uses 3."""
    cutmix_side: list[float] | None = None
    """[lo, hi]: each box's height and width are fractions uniform in [lo, hi] of the crop's
    (STPG: [0.25, 0.5]); None: UniMatch's box, area 0.02-0.4 of the crop."""
    cutmix_area: list[float] | None = None
    """[lo, hi]: CPS's boxes instead (TorchSemiSeg's BoxMaskGenerator: each of the
    `cutmix_boxes` boxes covers p / cutmix_boxes of the crop, p uniform in [lo, hi], random
    aspect ratio, XOR-combined; CPS and FPL: 3 boxes, [0.25, 0.5], cutmix_p 1)."""
    cutmix_source: Literal["independent", "same_image"] = "independent"
    """What a view is pasted from: a second, independently drawn unlabeled batch, or (the
    released UniMatch, DAW, rank-weighting, CPS and FPL code, which zip a loader with itself)
    another augmentation of the same images."""
    oracle_eval: bool = False
    """Research diagnostics: read the unlabeled images' masks (if every line has one) to log
    pseudo-label accuracy of used and discarded pixels. They never enter a loss."""

    def validate(self) -> None:
        super().validate()
        self.probability("cutmix_p")
        self.require(self.cutmix_boxes >= 1, "cutmix_boxes", "must be at least 1")
        side = self.cutmix_side
        self.require(
            side is None or (len(side) == 2 and 0 < side[0] <= side[1] <= 1),
            "cutmix_side",
            "must be [lo, hi] with 0 < lo <= hi <= 1",
        )
        area = self.cutmix_area
        self.require(
            area is None or (len(area) == 2 and 0 < area[0] <= area[1] <= 1),
            "cutmix_area",
            "must be [lo, hi] with 0 < lo <= hi <= 1",
        )
        self.require(
            area is None or side is None,
            "cutmix_area",
            "and cutmix_side are two box shapes: give one",
        )


@dataclass
class UnsupervisedWeightOptions(SchemeOptions):
    unsup_weight: float = 1.0
    """Weight of the unlabeled loss against the labeled one."""

    def validate(self) -> None:
        super().validate()
        self.require(self.unsup_weight >= 0, "unsup_weight", "must be >= 0")


@dataclass
class LossScaleOptions(SchemeOptions):
    loss_scale: float = 0.5
    """The step's loss is loss_scale * (L_x + L_u). 0.5 is UniMatch's (L_x + L_u) / 2 (its
    paper and released code, and the released FixMatch, DAW and rank-weighting code built on
    it). 1.0 is FixMatch's paper (L_s + lambda_u L_u with lambda_u = 1, Sohn et al. 2020) and
    DAW's paper (L = L_s + L_u, Sec. 3.1): the labeled images then train at the rate they have
    in supervised-only training at the same learning rate, where 0.5 halves it."""

    def validate(self) -> None:
        super().validate()
        self.require(self.loss_scale > 0, "loss_scale", "must be > 0")


@dataclass
class TeacherDecayOptions(SchemeOptions):
    teacher_decay: float = 0.99
    """EMA decay of the teacher(s), warmed up as min(1 - 1/(step+1), decay)."""

    def validate(self) -> None:
        super().validate()
        self.decay("teacher_decay")


class SemiScheme(Scheme):
    """Base of schemes that learn from unlabeled images through the teaching path."""

    teaches: ClassVar[bool] = True

    def __init__(
        self,
        cfg: Any,
        models: dict[str, nn.Module],
        num_classes: int,
        teaching: Teaching | None = None,
    ):
        super().__init__(cfg, models, num_classes, teaching)
        if teaching is None:
            raise ValueError(
                f"scheme {self.name!r} needs a policy and an unlabeled loss (a Teaching)"
            )
        self.teaching: Teaching = teaching

    @staticmethod
    @torch.no_grad()
    def eval_prediction(model: nn.Module, images: torch.Tensor) -> SegmentationOutput:
        """The model's output on `images` in eval mode, then back to train mode.

        UniMatch's released code labels the mixing images this way (frozen BatchNorm
        statistics, no dropout), so the CutMix partner's label matches a test-time prediction.
        """
        model.eval()
        out = model(images)
        model.train()
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "policy": self.teaching.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teaching.load_state_dict(state["policy"])
