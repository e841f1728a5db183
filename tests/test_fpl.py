"""FPL: fuzzy positive assignment (Alg. 1), the loss (Eq. 7-9), adaptive weights (Eq. 11, 16), R (Eq. 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.losses import fuzzy_positive_loss
from semiseg.pseudo.fpl import (
    adaptive_weight,
    fuzzy_positive_mask,
    gradient_score_cases,
    k_values,
    positive_gradient_score,
)


def pixels(*rows: list[float]) -> torch.Tensor:
    """Probability vectors as a [N, C, 1, 1] batch (one pixel per image)."""
    return torch.tensor(rows, dtype=torch.float32)[:, :, None, None]


def sets(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(m[:, 0, 0]).flatten().tolist() for m in mask]


def test_assignment_on_hand_made_distributions():
    probs = pixels([0.5, 0.3, 0.15, 0.05], [0.95, 0.03, 0.01, 0.01], [0.05, 0.15, 0.3, 0.5])
    # Cumulative 0.5, 0.8, 0.95: first > 0.9 at n = 3, so K = 2; a confident pixel gets K = 1.
    assert sets(fuzzy_positive_mask(probs, 0.9)) == [[0, 1], [0], [2, 3]]
    assert k_values(fuzzy_positive_mask(probs, 0.9)).flatten().tolist() == [2, 1, 2]


def test_assignment_threshold_edges_and_official_comparison():
    probs = pixels(
        [0.5, 0.25, 0.125, 0.125]
    )  # exact binary fractions: cumulative 0.5, 0.75, 0.875, 1.0
    assert sets(fuzzy_positive_mask(probs, 0.875)) == [[0, 1, 2]]  # 0.875 is not > 0.875: n = 4
    assert sets(fuzzy_positive_mask(probs, 0.875, variant="official")) == [[0, 1]]  # >=: n = 3
    assert sets(fuzzy_positive_mask(probs, 1.0)) == [[0, 1, 2]]  # never exceeded: n = C, K = C - 1
    assert sets(fuzzy_positive_mask(probs, 0.0)) == [[0]]
    assert sets(fuzzy_positive_mask(probs, 0.4)) == [[0]]  # n = 1 gives K = max(0, 1) = 1
    with pytest.raises(ValueError, match="T must be in"):
        fuzzy_positive_mask(probs, 1.5)


def test_assignment_ties_follow_class_order_and_official_caps_k():
    tied = pixels([0.3, 0.1, 0.3, 0.3])
    assert sets(fuzzy_positive_mask(tied, 0.5)) == [[0]]  # 0.3, 0.6 > 0.5 at n = 2
    assert sets(fuzzy_positive_mask(tied, 0.85)) == [[0, 2]]  # 0.9 > 0.85 at n = 3
    uniform = pixels([0.125] * 8)
    assert k_values(fuzzy_positive_mask(uniform, 0.9)).item() == 7
    assert k_values(fuzzy_positive_mask(uniform, 0.9, variant="official")).item() == 3
    assert sets(fuzzy_positive_mask(uniform, 0.9, variant="official")) == [[0, 1, 2]]


def test_assignment_is_vectorised_over_images_and_pixels():
    torch.manual_seed(0)
    probs = torch.randn(2, 5, 3, 4).softmax(dim=1)
    mask = fuzzy_positive_mask(probs, 0.9)
    assert mask.shape == probs.shape and mask.dtype == torch.bool
    for b in range(2):
        for i in range(3):
            for j in range(4):
                single = fuzzy_positive_mask(probs[b : b + 1, :, i : i + 1, j : j + 1], 0.9)
                assert torch.equal(single[0, :, 0, 0], mask[b, :, i, j])
    # The set is always the K most probable classes.
    k = k_values(mask)
    kth = probs.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
    assert torch.all(probs.masked_fill(~mask, 2.0).amin(dim=1) >= kth)
    assert torch.all(probs.masked_fill(mask, -1.0).amax(dim=1) <= kth)


def test_loss_with_one_class_sets_equals_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, 5) * 3
    target = torch.randint(0, 6, (2, 5, 5))
    one_hot = F.one_hot(target, 6).permute(0, 3, 1, 2).bool()
    expected = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(fuzzy_positive_loss(logits, one_hot), expected)
    torch.testing.assert_close(
        fuzzy_positive_loss(logits, one_hot, reduction="mean"), expected.mean()
    )


def test_loss_on_a_hand_computed_pixel():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0])[None, :, None, None]
    mask = torch.tensor([True, True, False, False])[None, :, None, None]
    expected = math.log(1 + (math.exp(-2) + math.exp(-1)) * (math.exp(0) + math.exp(-1)))
    assert fuzzy_positive_loss(z, mask).item() == pytest.approx(expected, rel=1e-6)
    assert fuzzy_positive_loss(z, torch.ones_like(mask)).item() == 0.0


def test_loss_gradient_signs_follow_eq_8():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 4, 4, requires_grad=True)
    mask = fuzzy_positive_mask(torch.randn(3, 7, 4, 4).softmax(1), 0.9)
    fuzzy_positive_loss(logits, mask).sum().backward()
    grad = logits.grad
    assert torch.all(grad[mask] < 0)
    assert torch.all(grad[~mask] > 0)
    # Eq. 8 in closed form for one pixel.
    z = logits.detach()[0, :, 0, 0]
    m = mask[0, :, 0, 0]
    pos, neg = torch.exp(-z[m]).sum(), torch.exp(z[~m]).sum()
    denom = 1 + pos * neg
    expected = torch.where(m, -neg * torch.exp(-z) / denom, pos * torch.exp(z) / denom)
    torch.testing.assert_close(grad[0, :, 0, 0], expected)


def test_loss_has_no_nan_or_inf_for_logits_of_magnitude_100():
    torch.manual_seed(2)
    logits = (torch.randn(2, 5, 6, 6).sign() * 100).requires_grad_(True)
    mask = fuzzy_positive_mask(torch.randn(2, 5, 6, 6).softmax(1), 0.9)
    mask[0, :, 0, 0] = True  # a set holding every class
    loss = fuzzy_positive_loss(logits, mask)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    half = fuzzy_positive_loss(logits.detach().half(), mask)
    assert torch.isfinite(half).all()


def test_adaptive_weights_match_eq_11_and_16():
    probs = pixels([0.5, 0.3, 0.15, 0.05])
    mask = fuzzy_positive_mask(probs, 0.9)  # {0, 1}: mean 0.4, best outsider 0.15
    assert adaptive_weight(probs, mask).item() == pytest.approx(
        math.log(13.5) / math.log(21), rel=1e-5
    )
    assert adaptive_weight(probs, mask, shape="linear").item() == pytest.approx(
        0.25 / 0.4, rel=1e-5
    )
    assert adaptive_weight(probs, mask, shape="convex").item() == pytest.approx(
        0.25 / 1.0, rel=1e-5
    )
    # Official: the mean over the top-(K+1) = 0.95 / 3, convex without the factor 4.
    m = 0.95 / 3
    official = adaptive_weight(probs, mask, variant="official").item()
    assert official == pytest.approx(math.log(1 + 50 * (m - 0.15)) / math.log(1 + 50 * m), rel=1e-5)
    assert adaptive_weight(probs, mask, shape="convex", variant="official").item() == pytest.approx(
        (m - 0.15) / (m + 0.15), rel=1e-5
    )
    everything = torch.ones_like(mask)
    assert adaptive_weight(probs, everything).item() == pytest.approx(1.0)


def test_adaptive_weight_is_in_unit_interval_and_detached():
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 5, 5, requires_grad=True)
    probs = logits.softmax(1)
    mask = fuzzy_positive_mask(probs, 0.95)
    for shape in ("concave", "linear", "convex"):
        w = adaptive_weight(probs, mask, shape=shape)
        assert not w.requires_grad
        assert torch.all((w >= 0) & (w <= 1 + 1e-6))


def test_positive_gradient_score_matches_autograd_and_the_three_cases():
    z = torch.tensor([2.0, 1.0, 0.0, -1.0])[None, :, None, None]
    mask = torch.tensor([True, True, False, False])[None, :, None, None]
    # Case 2 (top-1 is class 0, truth 1 is in the set): e^-1 / (e^-2 + e^-1).
    gt = torch.tensor([[[1]]])
    r = positive_gradient_score(z, mask, gt).item()
    assert r == pytest.approx(math.exp(-1) / (math.exp(-2) + math.exp(-1)), rel=1e-6)
    # Case 3 (truth 2 outside the set): -e^0 / (e^0 + e^-1), negative.
    assert positive_gradient_score(z, mask, torch.tensor([[[2]]])).item() == pytest.approx(
        -1 / (1 + math.exp(-1)), rel=1e-6
    )
    top1 = torch.tensor([[[0]]])
    cases = [gradient_score_cases(top1, mask, torch.tensor([[[c]]])).item() for c in (0, 1, 2, 255)]
    assert cases == [1, 2, 3, 0]

    torch.manual_seed(4)
    logits = torch.randn(1, 6, 3, 3, requires_grad=True)
    mask = fuzzy_positive_mask(torch.randn(1, 6, 3, 3).softmax(1), 0.9)
    target = torch.randint(0, 6, (1, 3, 3))
    fuzzy_positive_loss(logits, mask).sum().backward()
    g = logits.grad
    expected = g.gather(1, target[:, None]).squeeze(1) / (g * mask).sum(dim=1)
    torch.testing.assert_close(positive_gradient_score(logits.detach(), mask, target), expected)
    assert torch.isnan(
        positive_gradient_score(logits.detach(), mask, torch.full_like(target, 255))
    ).all()
