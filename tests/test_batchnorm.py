"""Precise BN: running statistics re-estimated as the plain average over clean batches."""

from __future__ import annotations

import torch
from torch import nn

from semiseg.models import build_model
from semiseg.models.batchnorm import batchnorm_layers, recalibrate_batchnorm


def test_statistics_are_the_average_of_the_batches_with_dropout_off():
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm2d(2, momentum=0.1))
    batches = [torch.tensor([1.0, 3.0]).view(2, 1, 1, 1).expand(2, 2, 1, 1) + k for k in (0, 4)]
    model.train()
    count = recalibrate_batchnorm(model, batches, torch.device("cpu"))
    bn = model[1]
    assert count == 2
    # Batch means 2 and 6 (dropout would have zeroed most inputs), unbiased variances 2 and 2.
    assert torch.allclose(bn.running_mean, torch.tensor([4.0, 4.0]))
    assert torch.allclose(bn.running_var, torch.tensor([2.0, 2.0]))
    assert bn.momentum == 0.1
    assert not model.training and not bn.training


def test_no_batches_leave_the_statistics_as_they_were():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    assert recalibrate_batchnorm(bn, [], torch.device("cpu")) == 0
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5))
    assert torch.equal(bn.running_var, torch.full((3,), 2.0))


def test_a_segmentation_model_keeps_its_weights_and_updates_every_layer():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "tiny", 3)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    recalibrate_batchnorm(model, [torch.randn(2, 3, 32, 32) * 3 + 1], torch.device("cpu"))
    for key, value in model.state_dict().items():
        if key in weights and "num_batches" not in key:
            assert torch.equal(value, weights[key]), key
    for layer in batchnorm_layers(model):
        assert not torch.equal(layer.running_var, torch.ones_like(layer.running_var))
