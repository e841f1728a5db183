"""Warm starts: which checkpoint starts which network, and loading weights that must fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semiseg.config import ConfigError
from semiseg.warm_start import load_weights, warm_start_sources


class Net(nn.Module):
    def __init__(self, channels: int = 2, projector: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 1)
        if projector:
            self.projector = nn.Linear(channels, 3)


def test_one_path_starts_every_network_and_a_list_goes_in_order():
    assert warm_start_sources("a.pt", ("student", "student_b")) == {
        "student": "a.pt",
        "student_b": "a.pt",
    }
    assert warm_start_sources(["a.pt", "b.pt"], ("student", "student_b")) == {
        "student": "a.pt",
        "student_b": "b.pt",
    }
    with pytest.raises(ConfigError, match=r"1 checkpoints .* 2 network\(s\)"):
        warm_start_sources(["a.pt"], ("student", "student_b"))


def test_projection_heads_may_be_missing_on_either_side():
    source = Net(projector=True)
    target = Net()
    load_weights(target, source.state_dict(), "src.pt")
    assert torch.equal(target.conv.weight, source.conv.weight)

    with_head = Net(projector=True)
    head = with_head.projector.weight.clone()
    load_weights(with_head, Net().state_dict(), "src.pt")
    assert torch.equal(with_head.projector.weight, head)


def test_weights_that_do_not_fit_name_the_file_and_the_keys():
    with pytest.raises(ConfigError, match=r"model.init_from: src.pt does not fit this model:"):
        load_weights(Net(channels=3), Net(channels=2).state_dict(), "src.pt")
    state = {"other.weight": torch.zeros(1)}
    with pytest.raises(
        ConfigError, match=r"src.pt .*missing keys: \['conv.weight', 'conv.bias'\].*other.weight"
    ):
        load_weights(Net(), state, "src.pt")
