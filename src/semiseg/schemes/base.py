"""The scheme interface: which networks exist, what they read, and how one training step
computes the loss.

A scheme never reads files or touches the optimiser; the engine builds the networks it
names (already on the device and DDP-wrapped) and the data streams it declares (`views`),
gives it batches, and steps the optimiser on the loss it returns. Every scheme implements
the same few methods, so there is one training loop for all of them. A scheme class
carries its `Options` dataclass (the `scheme:` config section) beside it; registering it
(`semiseg.schemes.SCHEMES.add`) makes it a `scheme.name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from semiseg.losses import LABELED_LOSSES
from semiseg.models.ema import ModelEMA
from semiseg.models.segmentor import unwrap
from semiseg.options import ComponentOptions, ConfigError, Options

if TYPE_CHECKING:
    from semiseg.schemes.teaching import Teaching


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass(frozen=True)
class Views:
    """What a scheme reads of each unlabeled image: `strong` photometrically strong views of
    the weak crop (`strong1`, `strong2`), `boxes` CutMix boxes (`box1`, `box2`), and whether
    it pastes from a second, independently drawn unlabeled stream (`mix`). The weak crop
    (`image`) and its `valid` map always come."""

    strong: int
    boxes: int
    mix: bool = True


@dataclass
class SchemeOptions(ComponentOptions):
    """Options every scheme takes (the `scheme:` config section)."""

    name: str = "supervised"


@dataclass
class EvalEMAOptions(Options):
    """An EMA copy of the (first) student, kept for evaluation."""

    ema_decay: float = 0.0
    """Decay of an EMA copy of the student kept for evaluation (UniMatch/DAW use 0.999); 0 keeps none."""
    eval_ema: bool = False
    """Evaluate (and pick the best checkpoint by) the EMA copy instead of the raw student."""

    def validate(self) -> None:
        super().validate()
        self.decay("ema_decay")
        self.require(
            not self.eval_ema or self.ema_decay > 0, "eval_ema", "needs scheme.ema_decay > 0"
        )


@dataclass
class AuxOptions(Options):
    """Schemes that train a model's auxiliary head (PSPNet) on labeled masks."""

    aux_weight: float = 0.4
    """Weight of the auxiliary head's loss; models without one have nothing to weight."""

    def validate(self) -> None:
        super().validate()
        self.require(self.aux_weight >= 0, "aux_weight", "must be >= 0")


class Scheme:
    """Base class. Subclasses set `name`, `Options`, `summary`, `model_names` and, if they
    learn from unlabeled images, `views`; and implement `training_step`."""

    name: ClassVar[str]
    Options: ClassVar[type[SchemeOptions]]
    summary: ClassVar[str] = ""
    model_names: ClassVar[tuple[str, ...]] = ("student",)
    views: ClassVar[Views | None] = None
    """The unlabeled views the scheme reads; None: it reads no unlabeled stream."""
    teaches: ClassVar[bool] = False
    """It learns from online pseudo labels, through a policy and an unlabeled loss."""
    uses_pseudo_labels: ClassVar[bool] = False
    """Its second batch holds images with offline pseudo-label masks (data.pseudo_labeled);
    without that list, `semiseg.training.train` runs the self-training rounds that make it."""
    trains_aux: ClassVar[bool] = False
    """The labeled loss trains a model's auxiliary head (PSPNet); otherwise it gets no gradient."""

    def __init__(
        self,
        cfg: Any,
        models: dict[str, nn.Module],
        num_classes: int,
        teaching: Teaching | None = None,
    ):
        self.cfg = cfg
        self.options = cfg.scheme
        self.models = models
        self.num_classes = num_classes
        self.labeled_loss = LABELED_LOSSES.get(cfg.labeled_loss.name)(cfg.labeled_loss)
        decay = getattr(self.options, "ema_decay", 0.0)
        self.ema = ModelEMA(unwrap(models[self.model_names[0]]), decay) if decay > 0 else None

    @classmethod
    def projection_dim(cls, options: SchemeOptions) -> int | None:
        """Channels of the projection head the engine adds to every network (contrastive
        schemes); None: no projection head."""
        return None

    @classmethod
    def untrained(cls, options: SchemeOptions, model: nn.Module) -> list[str]:
        """Qualified names of parameters and buffers of `model` that no step of this scheme
        trains (a PSPNet auxiliary head the scheme gives no loss); DDP leaves them alone."""
        return [] if cls.trains_aux else model.aux_head_names()

    @classmethod
    def may_leave_unused(cls, options: SchemeOptions, model: nn.Module) -> bool:
        """Whether some steps leave parameters of `model` without a gradient that other steps
        train (DDP must then look for them at every step); by default none."""
        return False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, with a `ConfigError` that says why, a config this scheme cannot run."""
        if not cls.teaches:
            for section in ("policy", "loss"):
                if getattr(cfg, section) is not None:
                    raise ConfigError(
                        f"scheme {cls.name!r} learns from no online pseudo labels, so it takes no {section!r} "
                        f"section; remove it (or pick a semi-supervised scheme)"
                    )

    def train(self) -> None:
        for model in self.models.values():
            model.train()

    def parameter_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone parameters at `lr`, decoder/head parameters at `lr * head_lr_mult`."""
        groups = []
        for model in self.models.values():
            bare = unwrap(model)
            groups.append({"params": list(bare.backbone_parameters()), "lr_mult": 1.0})
            groups.append({"params": list(bare.head_parameters()), "lr_mult": head_lr_mult})
        for group in groups:
            group["lr"] = lr * group["lr_mult"]
        return groups

    def training_step(
        self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int
    ) -> StepOutput:
        """The loss of one step. `unlabeled` and `mix` (the CutMix source) are None for
        schemes without `views`; for `uses_pseudo_labels`, `unlabeled` holds the
        pseudo-labeled batch."""
        raise NotImplementedError

    def after_optimizer_step(self, iteration: int) -> None:
        if self.ema is not None:
            self.ema.update(self.models[self.model_names[0]], iteration)

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's prediction model."""
        if getattr(self.options, "eval_ema", False) and self.ema is not None:
            return self.ema.module
        return unwrap(self.models[self.model_names[0]])

    def state_dict(self) -> dict:
        """Everything a resume needs beyond the models and the optimiser."""
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            if state.get("ema") is None:
                raise RuntimeError("checkpoint has no EMA state but scheme.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in batch.items()
        }
