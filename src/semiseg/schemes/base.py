"""The scheme interface: which networks exist and how one training step computes the loss.

A scheme never reads files or touches the optimiser; the engine builds the networks it
names (already on the device and DDP-wrapped), gives it batches, and steps the optimiser
on the loss it returns. Later schemes (mean teacher, FixMatch, UniMatch, CPS, ...)
implement the same few methods, so there is one training loop for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from semiseg.config import Config
from semiseg.models.ema import ModelEMA
from semiseg.pseudo import Policy


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)


class Scheme:
    """Base class. Subclasses set `model_names` and implement `training_step`."""

    model_names: ClassVar[tuple[str, ...]] = ("student",)
    uses_unlabeled: ClassVar[bool] = False
    uses_pseudo_labels: ClassVar[bool] = False
    projection_dim: ClassVar[int | None] = None
    """Channels of the projection head the engine adds to every network (contrastive schemes)."""
    """The `unlabeled` batch holds images with offline pseudo-label masks (data.pseudo_labeled)."""

    def __init__(
        self,
        cfg: Config,
        models: dict[str, nn.Module],
        num_classes: int,
        policy: Policy | None = None,
    ):
        self.cfg = cfg
        self.models = models
        self.num_classes = num_classes
        decay = cfg.scheme.ema_decay
        self.ema = ModelEMA(unwrap(models[self.model_names[0]]), decay) if decay > 0 else None

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
        schemes with `uses_unlabeled = False`."""
        raise NotImplementedError

    def after_optimizer_step(self, iteration: int) -> None:
        if self.ema is not None:
            self.ema.update(self.models[self.model_names[0]], iteration)

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's prediction model."""
        if self.cfg.scheme.eval_ema and self.ema is not None:
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
