"""STPG: mismatch scores and pixel selection, anchors, Hungarian matching, contrastive losses, the scheme."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import crash_at, tiny_config

from semiseg.checkpoint import load_checkpoint
from semiseg.cli import main
from semiseg.config import config_from_dict
from semiseg.metrics_log import read_metrics
from semiseg.pseudo.memory import FeatureBank
from semiseg.pseudo.stpg import (
    anchor_contrastive_loss,
    confusion,
    ema_prototypes,
    match_anchors,
    mismatch_parts,
    mismatch_scores,
    optimize_anchors,
    select_professional,
    selection_mask,
    similarity_loss,
)
from semiseg.training import train

STUDENT = torch.tensor([[[0, 0, 1, 1, 2, 2, 255]]])
TEACHER = torch.tensor([[[0, 1, 1, 1, 0, 2, 1]]])


def test_mismatch_scores_on_a_hand_made_confusion_matrix():
    m = confusion(STUDENT, TEACHER, 4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # I_0 = 1/2 + 1/2; I_1 = 0/2 + 1/3; I_2 = 1/2 + 0/1; class 3 never predicted: 0/0 -> 0.
    assert mismatch_scores(STUDENT, TEACHER, 4).tolist() == pytest.approx([1.0, 1 / 3, 0.5, 0.0])


def test_selection_keeps_consistent_and_highly_mismatched_pixels():
    scores = mismatch_scores(STUDENT, TEACHER, 4)
    # Pixel 1: student 0 (I = 1), teacher 1 (I = 1/3): low. Pixel 4: student 2 (0.5) < teacher 0 (1): high.
    assert select_professional(STUDENT, TEACHER, scores).flatten().tolist() == [
        True,
        False,
        True,
        True,
        True,
        True,
        False,
    ]
    consistent, high, low = mismatch_parts(STUDENT, TEACHER, scores)
    assert consistent.flatten().tolist() == [True, False, True, True, False, True, False]
    assert high.flatten().tolist() == [False, False, False, False, True, False, False]
    assert low.flatten().tolist() == [False, True, False, False, False, False, False]
    assert selection_mask(STUDENT, TEACHER, scores, "cons+lmis").flatten().tolist() == [
        True,
        True,
        True,
        True,
        False,
        True,
        False,
    ]
    assert selection_mask(STUDENT, TEACHER, scores, "all").sum() == 6  # the 255 pixel never counts
    with pytest.raises(ValueError, match="selection"):
        selection_mask(STUDENT, TEACHER, scores, "most")


def test_optimised_anchors_are_near_equidistant():
    anchors = optimize_anchors(num_classes=5, dim=16, tau=0.5, steps=1500, seed=0)
    cos = anchors @ anchors.T
    off = cos[~torch.eye(5, dtype=torch.bool)]
    assert anchors.norm(dim=1).tolist() == pytest.approx([1.0] * 5, abs=1e-5)
    # The regular simplex: every pair at cosine -1/(C-1).
    assert off.mean().item() == pytest.approx(-0.25, abs=0.01) and off.std().item() < 0.01
    assert torch.equal(anchors, optimize_anchors(5, 16, 0.5, 1500, seed=0))


def test_hungarian_match_is_the_cost_minimising_permutation():
    torch.manual_seed(0)
    prototypes, anchors = torch.randn(5, 8), torch.randn(5, 8)
    sigma = match_anchors(prototypes, anchors)
    assert sorted(sigma.tolist()) == list(range(5))

    def cost(perm) -> float:
        return sum(float((anchors[perm[i]] - prototypes[i]).norm()) for i in range(5))

    best = min(itertools.permutations(range(5)), key=cost)
    assert cost(sigma.tolist()) == pytest.approx(cost(best))


def test_contrastive_losses_on_hand_computed_features():
    anchors = torch.eye(2)
    sigma = torch.tensor([1, 0])  # class 0 -> anchor 1, class 1 -> anchor 0
    f = torch.tensor([[0.0, 3.0]])  # normalised to [0, 1]: at class 0's anchor
    expected = math.log(1 + math.exp(-2.0))  # -log(e^{1/0.5} / (e^{1/0.5} + e^{0}))
    assert anchor_contrastive_loss(
        f, torch.tensor([0]), anchors, sigma, tau=0.5
    ).item() == pytest.approx(expected)
    assert anchor_contrastive_loss(
        f, torch.tensor([1]), anchors, sigma, tau=0.5
    ).item() == pytest.approx(math.log(1 + math.exp(2.0)))
    means = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    valid = torch.tensor([True, False])
    assert similarity_loss(f, torch.tensor([0]), means, valid).item() == pytest.approx(0.0)
    g = torch.tensor([[2.0, 0.0], [5.0, 5.0]])
    assert similarity_loss(g, torch.tensor([0, 1]), means, valid).item() == pytest.approx(
        1.0
    )  # class 1 skipped


def test_similarity_loss_on_a_bank_of_unit_features_is_eq16_over_its_entries():
    bank = FeatureBank(num_classes=2, dim=2, size=4)
    entries = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    bank.push(entries, torch.tensor([0, 0, 0]))
    means, valid = bank.prototypes()
    f = torch.tensor([[3.0, 1.0]])
    expected = (1 - F.cosine_similarity(f.expand(3, 2), entries, dim=1)).mean()
    assert similarity_loss(f, torch.tensor([0]), means, valid).item() == pytest.approx(
        expected.item()
    )


def test_prototype_ema_starts_from_the_first_mean():
    prototypes = torch.zeros(3, 2)
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    prototypes, seen = ema_prototypes(prototypes, feats, torch.tensor([0, 0, 1]), alpha=0.9)
    assert prototypes.tolist() == [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]] and seen.tolist() == [
        True,
        True,
        False,
    ]
    prototypes, seen = ema_prototypes(
        prototypes, torch.tensor([[12.0, 0.0]]), torch.tensor([0]), alpha=0.9, seen=seen
    )
    assert prototypes[0].tolist() == pytest.approx([0.9 * 2 + 0.1 * 12, 0.0])


def stpg_config(root, out, **stpg):
    return config_from_dict(
        tiny_config(
            root,
            out,
            scheme={
                "name": "stpg",
                "match_after": 2,
                "anchor_steps": 50,
                "bank_topk": 8,
                "phi": 0.0,
                **stpg,
            },
            policy={"name": "pseudo_label"},
            train={"iterations": 4, "eval_every": 4, "log_every": 2, "checkpoint_every": 2},
        )
    )


def test_stpg_trains_logs_selection_and_resumes_exactly(synthetic_root, tmp_path, monkeypatch):
    train(stpg_config(synthetic_root, tmp_path / "ref"), progress=False)
    last = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if r["split"] == "train"][
        -1
    ]
    shares = (
        last["stpg/share_consistent"]
        + last["stpg/share_high_mismatch"]
        + last["stpg/share_low_mismatch"]
    )
    assert shares == pytest.approx(1.0, abs=1e-4)
    assert "stpg/mismatch/0" in last and last["loss_sim"] > 0 and math.isfinite(last["loss"])
    assert main(["plot", str(tmp_path / "ref")]) == 0
    assert (tmp_path / "ref" / "plots" / "stpg_mismatch.png").is_file()

    cfg = stpg_config(synthetic_root, tmp_path / "killed")
    crash_at(cfg, 3, monkeypatch)
    train(cfg, progress=False)
    a, b = (
        load_checkpoint(tmp_path / "ref" / "latest.pt"),
        load_checkpoint(tmp_path / "killed" / "latest.pt"),
    )
    for name in ("student", "student_pro"):
        assert all(torch.equal(v, b["models"][name][k]) for k, v in a["models"][name].items()), name
    assert torch.equal(a["scheme"]["bank"]["queues"], b["scheme"]["bank"]["queues"])
    assert torch.equal(a["scheme"]["sigma"], b["scheme"]["sigma"])


def test_dual_mean_teacher_without_selection_or_contrast(synthetic_root, tmp_path):
    train(
        stpg_config(synthetic_root, tmp_path / "dm", selection="all", lambda_ctr=0.0),
        progress=False,
    )
    last = [r for r in read_metrics(tmp_path / "dm" / "metrics.jsonl") if r["split"] == "train"][-1]
    assert "loss_ac" not in last and math.isfinite(last["loss_u_pro"])


def test_confidences_keep_their_values_on_the_feature_grid():
    """The bank's phi test reads teacher confidences resampled to the projection's grid; a
    cast to integers there would leave only exact 1.0s."""
    from semiseg.schemes.stpg import _grid

    conf = torch.tensor([[[0.97, 0.2], [0.5, 0.96]]])
    assert torch.equal(_grid(conf, (2, 2)), conf)
    assert _grid(conf, (1, 1)).dtype == torch.float32
    labels = torch.tensor([[[3, 255], [1, 2]]])
    assert torch.equal(_grid(labels, (2, 2)), labels)
