"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from semiseg.models.segmentor import unwrap


class ModelEMA:
    """A weight-averaged copy of a model: the mean teacher of Tarvainen & Valpola (NeurIPS
    2017) and the EMA model UniMatch and others evaluate.

    After each optimiser step, ``update(model, step)`` sets every parameter to
    ``d * ema + (1 - d) * param`` with ``d = min(1 - 1 / (step + 1), decay)``: step 0 copies
    the model, early steps average all weights seen so far (so the teacher is not stuck
    near the random start), and from step ``1 / (1 - decay) - 1`` on the decay is constant.
    Buffers (BatchNorm running statistics) are copied, not averaged.

    The copy lives in ``self.module``, in eval mode and without gradients; call
    ``ema.module(x)`` to predict with it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards ``model`` (DDP-wrapped or not); ``step`` counts from 0."""
        d = min(1.0 - 1.0 / (step + 1), self.decay)
        source = unwrap(model)
        params = dict(source.named_parameters())
        for name, ema_param in self.module.named_parameters():
            ema_param.lerp_(params[name].detach(), 1.0 - d)
        buffers = dict(source.named_buffers())
        for name, ema_buffer in self.module.named_buffers():
            ema_buffer.copy_(buffers[name])

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's state dict (loadable into a plain model of the same kind)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.module.load_state_dict(state_dict)
