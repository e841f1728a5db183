"""BatchNorm running statistics re-estimated on clean images ("precise BN").

Why: a semi-supervised step runs its network in training mode on more than the images it is
evaluated on. UniMatch's student sees a strongly augmented batch (colour jitter, grayscale,
blur, CutMix) after the weak one, and its decoder sees features half zeroed by the feature
perturbation; FixMatch and CPS forward strong views too. BatchNorm's running mean and
variance, an exponential average with momentum 0.1 over the last few forward passes, then
describe a mixture of clean and perturbed inputs, and evaluation normalises clean images
with it. Re-estimating the statistics over clean training crops with the trained weights
removes that mismatch without changing a weight (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021, Sec. 3: PreciseBN).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of `model` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Iterable[Tensor], device: torch.device) -> int:
    """Replace every BatchNorm's running mean and variance by their average over `images`.

    `images`: batches [B, 3, H, W] (normalised, as the model is trained on) of clean training
    crops; every batch gets the same weight (PyTorch's cumulative average, momentum None).
    The rest of the network stays in eval mode while the statistics are gathered, so
    dropout, drop-connect and feature perturbation are off. Runs in float32 without
    autocast. The model is left in eval mode with its momenta restored. Returns the number
    of batches used; with none, the statistics are left as they were.
    """
    layers = batchnorm_layers(model)
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in layers}
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = 0
    for batch in images:
        model(batch.to(device, non_blocking=True))
        count += 1
    for m in layers:
        mean, var, momentum = saved[id(m)]
        if count == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        m.momentum = momentum
        m.eval()
    return count
