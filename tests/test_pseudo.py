"""Pseudo-label policies on hand-computed inputs; DAW's t* against scipy's densities and root finder."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm, truncnorm

import semiseg.pseudo.daw as daw_module
from semiseg.pseudo import (
    POLICIES,
    ConstantPolicy,
    DAWeighting,
    PowerPolicy,
    PseudoLabels,
    RankWeighting,
    ThresholdPolicy,
    build_policy,
    mean_weight,
    optimal_threshold,
    trade_off,
    used_fraction,
)

# ---------------------------------------------------------------------------------------
# helpers
# Probabilities are float32 like a network's, so values such as 0.9 carry ~1e-8 rounding:
# statistics are compared at rel=1e-6.


def class_maps(
    conf: list[list[float]], pred: list[list[int]], num_classes: int = 3
) -> torch.Tensor:
    """[B,C,1,W] probabilities with max `conf` at class `pred`, the rest spread evenly."""
    conf_t = torch.tensor(conf, dtype=torch.float64)
    pred_t = torch.tensor(pred)
    rest = ((1.0 - conf_t) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes, -1).clone()
    rest.scatter_(1, pred_t.unsqueeze(1), conf_t.unsqueeze(1))
    return rest.unsqueeze(2).float()


def truncated_pdf(p, mu: float, sigma: float, num_classes: int):
    low = 1.0 / num_classes
    return truncnorm.pdf(p, (low - mu) / sigma, (1.0 - mu) / sigma, loc=mu, scale=sigma)


# Image 0: confidences 0.9, 0.8, 0.7 correct, 0.5 wrong.
# Image 1: 0.6 correct, 0.4 and 0.5 wrong, 0.99 on an ignored pixel.
CONF = [[0.9, 0.8, 0.7, 0.5], [0.6, 0.4, 0.5, 0.99]]
PRED = [[0, 1, 2, 0], [2, 1, 0, 1]]
LABELS = torch.tensor([[[0, 1, 2, 1]], [[2, 0, 1, 255]]])
# Eq. 5 by hand. Positive: image means 0.8 and 0.6 -> mu = 0.7; per-image mean squared
# deviations from 0.7: (0.04 + 0.01 + 0) / 3 and 0.01 -> mean 1/75; Eq. 6 factor 4/3.
PAPER_POS = (0.7, (1 / 75) * 4 / 3)
# Negative: image means 0.5 and 0.45 -> 0.475; deviations 0.025^2 and
# (0.075^2 + 0.025^2) / 2 -> mean 0.001875; factor 3/2.
PAPER_NEG = (0.475, 0.001875 * 3 / 2)


def labeled_batch():
    return class_maps(CONF, PRED), LABELS.clone()


def tiled_batch(times: int = 5):
    """The labeled batch repeated `times` along W (enough pixels for the official fit)."""
    probs, labels = labeled_batch()
    return probs.repeat(1, 1, 1, times), labels.repeat(1, 1, times)


def run_policy(policy: DAWeighting, labeled, unlabeled, valid=None) -> PseudoLabels:
    policy.update(*labeled)
    return policy(unlabeled, valid)


def assert_same_state(a: DAWeighting, b: DAWeighting, rel: float = 1e-12) -> None:
    for key in ("mu_pos", "var_pos", "mu_neg", "var_neg", "threshold"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=rel, abs=1e-15), key
    torch.testing.assert_close(a.p_labeled, b.p_labeled, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(a.p_unlabeled, b.p_unlabeled, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------
# optimal_threshold


@pytest.mark.parametrize(
    ("mu_p", "sd_p", "mu_n", "sd_n", "classes", "bracket"),
    [
        (0.85, 0.1, 0.55, 0.2, 21, None),  # sd+ < sd-: the smaller root
        (0.9, 0.05, 0.6, 0.15, 19, None),
        # sd+ > sd-: two crossings inside [1/C, 1] (the low one at ~0.095); the paper's sign
        # picks the upper one, where the positive density takes over for good.
        (0.8, 0.25, 0.4, 0.1, 21, (0.4, 1.0)),
    ],
)
def test_optimal_threshold_paper_is_crossing_of_truncated_densities(
    mu_p, sd_p, mu_n, sd_n, classes, bracket
):
    t = optimal_threshold(mu_p, sd_p**2, mu_n, sd_n**2, classes)
    assert isinstance(t, float)

    def gap(p):
        return truncated_pdf(p, mu_p, sd_p, classes) - truncated_pdf(p, mu_n, sd_n, classes)

    assert truncated_pdf(t, mu_p, sd_p, classes) == pytest.approx(
        truncated_pdf(t, mu_n, sd_n, classes), rel=1e-9
    )
    low, high = bracket or (1.0 / classes, 1.0)
    assert t == pytest.approx(brentq(gap, low, high, xtol=1e-14), abs=1e-10)
    assert gap(t - 1e-3) < 0 < gap(t + 1e-3)


def test_optimal_threshold_official_is_crossing_of_untruncated_densities():
    mu_p, sd_p, mu_n, sd_n, classes = 0.85, 0.1, 0.55, 0.2, 21
    t = optimal_threshold(mu_p, sd_p**2, mu_n, sd_n**2, classes, variant="official")

    def gap(p):
        return norm.pdf(p, mu_p, sd_p) - norm.pdf(p, mu_n, sd_n)

    # Only the released code's epsilons separate it from the exact untruncated crossing.
    assert t == pytest.approx(brentq(gap, 1.0 / classes, 1.0, xtol=1e-14), abs=1e-7)
    paper = optimal_threshold(mu_p, sd_p**2, mu_n, sd_n**2, classes)
    assert abs(t - paper) > 1e-3  # the truncation normalisers matter at these widths


def test_optimal_threshold_equal_variances():
    mu_p, mu_n, var, classes = 0.7, 0.5, 0.09, 10
    low = 1.0 / classes
    sd = math.sqrt(var)
    mass_p = norm.cdf((1 - mu_p) / sd) - norm.cdf((low - mu_p) / sd)
    mass_n = norm.cdf((1 - mu_n) / sd) - norm.cdf((low - mu_n) / sd)
    # beta1 = 0: beta2 t + beta3 = 0 with alpha/beta = mass_n/mass_p.
    beta2 = 2 * (mu_p - mu_n) * var
    beta3 = var * (mu_n**2 - mu_p**2) + 2 * var**2 * math.log(mass_n / mass_p)
    t = optimal_threshold(mu_p, var, mu_n, var, classes)
    assert t == pytest.approx(-beta3 / beta2, rel=1e-12)

    def gap(p):
        return truncated_pdf(p, mu_p, sd, classes) - truncated_pdf(p, mu_n, sd, classes)

    assert t == pytest.approx(brentq(gap, low, 1.0, xtol=1e-14), abs=1e-10)
    assert optimal_threshold(mu_p, var, mu_n, var, classes, variant="official") == low


def test_optimal_threshold_no_crossing_is_none():
    # Identical fits never cross (and are the paper's initial state).
    for variant in ("paper", "official"):
        assert optimal_threshold(0.1, 1.0, 0.1, 1.0, 10, variant=variant) is None
        assert optimal_threshold(0.6, 0.02, 0.6, 0.02, 10, variant=variant) is None
    # A degenerate (zero-variance) fit has no density.
    assert optimal_threshold(0.9, 0.0, 0.5, 0.01, 10) is None


def test_optimal_threshold_official_clamps_to_class_range():
    classes = 10
    # Raw official roots: ~1.0294 (wide positive overtakes a narrow negative near 1) and
    # ~0.0692 (below 1/C); the paper variant leaves its (different) roots unclamped.
    high = (0.5, 0.09, 0.9, 0.0025)
    low = (0.3, 0.01, 0.6, 0.09)
    assert optimal_threshold(*high, classes, variant="official") == 1.0
    assert optimal_threshold(*low, classes, variant="official") == 1.0 / classes
    assert optimal_threshold(*high, classes) > 1.0
    assert optimal_threshold(*low, classes) < 1.0 / classes


def test_optimal_threshold_accepts_tensors_and_validates():
    args = (torch.tensor(0.85), torch.tensor(0.01, dtype=torch.float64), 0.55, torch.tensor(0.04))
    t = optimal_threshold(*args, 21)
    assert isinstance(t, float)
    assert t == pytest.approx(optimal_threshold(0.85, 0.01, 0.55, 0.04, 21), rel=1e-6)
    with pytest.raises(ValueError):
        optimal_threshold(0.8, -0.1, 0.5, 0.1, 21)
    with pytest.raises(ValueError):
        optimal_threshold(0.8, 0.1, 0.5, 0.1, 21, variant="nope")


def test_trade_off_matches_truncated_masses():
    mu_p, var_p, mu_n, var_n, classes = 0.85, 0.01, 0.55, 0.04, 21
    t = optimal_threshold(mu_p, var_p, mu_n, var_n, classes)
    low = 1.0 / classes
    sd_p, sd_n = math.sqrt(var_p), math.sqrt(var_n)
    neg = truncnorm((low - mu_n) / sd_n, (1 - mu_n) / sd_n, loc=mu_n, scale=sd_n)
    pos = truncnorm((low - mu_p) / sd_p, (1 - mu_p) / sd_p, loc=mu_p, scale=sd_p)
    e1, e2 = trade_off(mu_p, var_p, mu_n, var_n, t, classes)
    assert e1 == pytest.approx(neg.sf(t), rel=1e-9)
    assert e2 == pytest.approx(pos.cdf(t), rel=1e-9)
    # t* minimises E1 + E2 (Eq. 10) among step functions.
    for other in (t - 0.02, t + 0.02):
        assert sum(trade_off(mu_p, var_p, mu_n, var_n, other, classes)) > e1 + e2


# ---------------------------------------------------------------------------------------
# DAWeighting: Gaussian fits and t*


def test_daw_paper_fit_momentum_zero_is_batch_statistics():
    policy = DAWeighting(3, momentum=0.0)
    policy.update(*labeled_batch())
    assert (policy.mu_pos, policy.var_pos) == pytest.approx(PAPER_POS, rel=1e-6)
    assert (policy.mu_neg, policy.var_neg) == pytest.approx(PAPER_NEG, rel=1e-6)
    expected_t = optimal_threshold(*PAPER_POS, *PAPER_NEG, 3)
    assert policy.threshold == pytest.approx(expected_t, rel=1e-6)


def test_daw_paper_fit_one_ema_step():
    policy = DAWeighting(3)  # m = 0.99, mean 1/3, variance 1.0
    assert policy.threshold == pytest.approx(1 / 3)
    policy.update(*labeled_batch())
    assert policy.mu_pos == pytest.approx(0.99 / 3 + 0.01 * PAPER_POS[0], rel=1e-9)
    assert policy.var_pos == pytest.approx(0.99 + 0.01 * PAPER_POS[1], rel=1e-9)
    assert policy.mu_neg == pytest.approx(0.99 / 3 + 0.01 * PAPER_NEG[0], rel=1e-9)
    assert policy.var_neg == pytest.approx(0.99 + 0.01 * PAPER_NEG[1], rel=1e-9)
    expected = optimal_threshold(policy.mu_pos, policy.var_pos, policy.mu_neg, policy.var_neg, 3)
    assert policy.threshold == expected


def test_daw_official_fit_pools_pixels_and_needs_ten():
    policy = DAWeighting(3, momentum=0.0, variant="official")
    assert (policy.var_pos, policy.threshold) == (0.5, 0.95)
    policy.update(*labeled_batch())  # 4 positive, 3 negative pixels: no update
    assert (policy.mu_pos, policy.var_pos, policy.mu_neg, policy.var_neg) == (
        1 / 3,
        0.5,
        1 / 3,
        0.5,
    )
    assert policy.threshold == 0.95

    policy.update(*tiled_batch(5))
    # Positive: 0.9, 0.8, 0.7, 0.6 five times each: mean 0.75, squared deviations 0.25.
    assert policy.mu_pos == pytest.approx(0.75, rel=1e-6)
    assert policy.var_pos == pytest.approx(0.25 / (19 + 1e-8), rel=1e-6)
    # Negative: 0.5 ten times, 0.4 five times: mean 7/15, squared deviations 1/30.
    assert policy.mu_neg == pytest.approx(7 / 15, rel=1e-6)
    assert policy.var_neg == pytest.approx((1 / 30) / (14 + 1e-8), rel=1e-6)

    paper = DAWeighting(3, momentum=0.0)
    paper.update(*labeled_batch())
    assert paper.mu_pos == pytest.approx(0.7)  # per image means, not pooled (0.75)


def test_daw_undefined_threshold_keeps_previous():
    # Official: positive and negative sets with identical confidences -> identical fits,
    # zero discriminant -> no new t*.
    policy = DAWeighting(3, momentum=0.0, variant="official", align=False)
    conf = [[0.75, 0.5] * 5, [0.75, 0.5] * 5]
    probs = class_maps(conf, [[0] * 10, [0] * 10])
    labels = torch.tensor([[[0] * 10], [[1] * 10]])
    policy.update(probs, labels)
    assert policy.mu_pos == policy.mu_neg == pytest.approx(0.625)
    assert policy.var_pos == policy.var_neg
    assert policy.threshold == 0.95


def test_daw_paper_keeps_previous_threshold_when_none(monkeypatch):
    policy = DAWeighting(3, momentum=0.0)
    policy.update(*labeled_batch())
    before = policy.threshold
    monkeypatch.setattr(daw_module, "optimal_threshold", lambda *args, **kwargs: None)
    policy.update(*tiled_batch(2))
    assert policy.threshold == before
    assert policy.mu_pos != PAPER_POS[0] or policy.var_pos != PAPER_POS[1]


def test_daw_diagnostics():
    policy = DAWeighting(3, momentum=0.0)
    policy.update(*labeled_batch())
    diag = policy.diagnostics()
    assert diag["t"] == policy.threshold
    assert diag["sigma_pos"] == pytest.approx(math.sqrt(PAPER_POS[1]), rel=1e-6)
    assert diag["mu_neg"] == pytest.approx(PAPER_NEG[0], rel=1e-6)
    e1, e2 = trade_off(
        policy.mu_pos, policy.var_pos, policy.mu_neg, policy.var_neg, policy.threshold, 3
    )
    assert (diag["E1"], diag["E2"]) == (e1, e2)
    ratio = policy.p_labeled / policy.p_unlabeled
    assert diag["da_ratio_min"] == pytest.approx(float(ratio.min()))
    assert diag["da_ratio_max"] == pytest.approx(float(ratio.max()))
    assert "da_ratio_min" not in DAWeighting(3, align=False).diagnostics()


# ---------------------------------------------------------------------------------------
# DAWeighting: distribution alignment and weights

UNLABELED = torch.tensor([[0.5, 0.3], [0.25, 0.3], [0.25, 0.4]]).view(1, 3, 1, 2)
LABELED = torch.tensor([[0.6, 0.2], [0.3, 0.5], [0.1, 0.3]]).view(1, 3, 1, 2)


def test_daw_paper_alignment_hand_computed():
    policy = DAWeighting(3, momentum=0.0, weighting=False)
    policy.update(LABELED, torch.tensor([[[0, 1]]]))
    pl = policy(UNLABELED)
    # Labeled mean distribution (0.4, 0.4, 0.2); unlabeled (0.4, 0.275, 0.325).
    ratio = torch.tensor([1.0, 0.4 / 0.275, 0.2 / 0.325])
    aligned = UNLABELED[0, :, 0].T * ratio
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    torch.testing.assert_close(pl.confidence[0, 0], aligned.max(dim=1).values)
    # The second pixel's argmax moves from class 2 (0.4) to class 1 (0.3 * 1.45).
    assert pl.target.tolist() == [[[0, 1]]]
    assert pl.weight.tolist() == [[[1.0, 1.0]]]
    torch.testing.assert_close(
        policy.p_unlabeled, torch.tensor([0.4, 0.275, 0.325], dtype=torch.float64)
    )


def test_daw_official_alignment_hand_computed():
    policy = DAWeighting(3, momentum=0.0, weighting=False, variant="official")
    # Labeled argmax: class 0 (0.6) and class 1 (0.5); class 2 absent keeps 1/3.
    policy.update(LABELED, torch.tensor([[[0, 1]]]))
    expected_l = torch.tensor([0.6, 0.5, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(policy.p_labeled, expected_l)
    pl = policy(UNLABELED)
    # Unlabeled argmax: class 0 (0.5) and class 2 (0.4); class 1 absent keeps 1/3.
    expected_u = torch.tensor([0.5, 1 / 3, 0.4], dtype=torch.float64)
    torch.testing.assert_close(policy.p_unlabeled, expected_u)
    ratio = (expected_l / expected_u).float()
    aligned = UNLABELED[0, :, 0].T * ratio
    aligned = aligned / aligned.sum(dim=1, keepdim=True)
    torch.testing.assert_close(pl.confidence[0, 0], aligned.max(dim=1).values)
    assert pl.target.tolist() == [[aligned.argmax(dim=1).tolist()]]


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_daw_alignment_rows_sum_to_one_and_identity(variant):
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 5, 4, 6, generator=gen).mul(2).softmax(dim=1)
    labels = torch.randint(0, 5, (2, 4, 6), generator=gen)
    policy = DAWeighting(5, momentum=0.0, variant=variant)
    policy.update(probs, labels)
    # Same predictions on both sides: the ratio is 1 and DA is the identity.
    pl = policy(probs)
    torch.testing.assert_close(policy.aligned(probs), probs)
    torch.testing.assert_close(pl.confidence, probs.max(dim=1).values)
    # Different unlabeled predictions: a non-trivial ratio, rows still sum to 1.
    other = torch.randn(2, 5, 4, 6, generator=gen).mul(3).softmax(dim=1)
    policy(other)
    assert not torch.allclose(policy.align_ratio(), torch.ones(5, dtype=torch.float64))
    aligned = policy.aligned(other)
    torch.testing.assert_close(aligned.sum(dim=1), torch.ones(2, 4, 6))
    assert bool((aligned >= 0).all())


def test_daw_step_weights_and_invalid_pixels():
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 4, 5, 5, generator=gen).mul(2).softmax(dim=1)
    valid = torch.rand(2, 5, 5, generator=gen) > 0.3
    policy = DAWeighting(4, align=False)
    policy.threshold = 0.6
    pl = policy(probs, valid)
    conf = probs.max(dim=1).values
    assert pl.weight.dtype == torch.float32 and pl.target.dtype == torch.int64
    assert set(pl.weight.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(pl.weight, ((conf >= 0.6) & valid).float())
    assert bool((pl.target[~valid] == 255).all())
    assert bool((pl.target[valid] == probs.argmax(dim=1)[valid]).all())


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_daw_invalid_pixels_stay_out_of_statistics(variant):
    probs = UNLABELED.repeat(1, 1, 1, 2)
    junk = probs.clone()
    junk[..., 2:] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    valid = torch.tensor([[[True, True, False, False]]])
    a, b, cropped = (DAWeighting(3, momentum=0.5, variant=variant) for _ in range(3))
    pa, pb, pc = a(probs, valid), b(junk, valid), cropped(probs[..., :2])
    torch.testing.assert_close(a.p_unlabeled, cropped.p_unlabeled)
    torch.testing.assert_close(b.p_unlabeled, cropped.p_unlabeled)
    torch.testing.assert_close(pa.weight[..., :2], pc.weight)
    torch.testing.assert_close(pb.weight[..., :2], pc.weight)
    assert pb.target.tolist() == [[[*pc.target[0, 0].tolist(), 255, 255]]]
    labels = torch.tensor([[[0, 2, 255, 255]]])
    a.update(probs, labels)
    b.update(junk, labels)
    cropped.update(probs[..., :2], labels[..., :2])
    assert_same_state(a, cropped)
    assert_same_state(b, cropped)


def test_daw_switches():
    gen = torch.Generator().manual_seed(2)
    probs = torch.randn(1, 3, 4, 4, generator=gen).softmax(dim=1)
    no_align = DAWeighting(3, momentum=0.0, align=False)
    no_align.update(LABELED, torch.tensor([[[0, 1]]]))
    pl = no_align(probs)
    torch.testing.assert_close(pl.confidence, probs.max(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(no_align.p_unlabeled, torch.full((3,), 1 / 3, dtype=torch.float64))

    no_weighting = DAWeighting(3, weighting=False)
    no_weighting.threshold = 0.99
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0] = False
    pl = no_weighting(probs, valid)
    torch.testing.assert_close(pl.weight, valid.float())


def test_daw_state_round_trip():
    policy = DAWeighting(3, momentum=0.9)
    policy.update(*tiled_batch(2))
    policy(class_maps([[0.6, 0.9]], [[1, 2]]))
    state = policy.state_dict()
    copy = DAWeighting(3, momentum=0.9)
    copy.load_state_dict(state)
    state["p_labeled"].fill_(0.0)  # the copy holds clones, not views
    assert_same_state(policy, copy, rel=0)
    probs, labels = tiled_batch(3)
    unlabeled = class_maps([[0.55, 0.8, 0.95]], [[0, 1, 2]])
    out_a = run_policy(policy, (probs, labels), unlabeled)
    out_b = run_policy(copy, (probs, labels), unlabeled)
    for name in ("target", "weight", "confidence"):
        assert torch.equal(getattr(out_a, name), getattr(out_b, name))
    assert_same_state(policy, copy, rel=0)

    with pytest.raises(ValueError):
        DAWeighting(4).load_state_dict(policy.state_dict())
    with pytest.raises(ValueError):
        DAWeighting(3, variant="official").load_state_dict(policy.state_dict())
    with pytest.raises(ValueError):
        DAWeighting(3).load_state_dict(
            {k: v for k, v in policy.state_dict().items() if k != "mu_pos"}
        )
    with pytest.raises(ValueError):
        ThresholdPolicy(3).load_state_dict(policy.state_dict())


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_daw_reduce_doubling_is_two_identical_processes(variant):
    probs, labels = tiled_batch(5)
    doubled = DAWeighting(3, momentum=0.0, variant=variant, reduce=lambda t: 2 * t)
    doubled.update(probs, labels)
    single = DAWeighting(3, momentum=0.0, variant=variant)
    single.update(probs, labels)
    pooled = DAWeighting(3, momentum=0.0, variant=variant)
    pooled.update(torch.cat([probs, probs]), torch.cat([labels, labels]))
    assert doubled.mu_pos == pytest.approx(single.mu_pos, rel=1e-12)
    assert doubled.mu_neg == pytest.approx(single.mu_neg, rel=1e-12)
    torch.testing.assert_close(doubled.p_labeled, single.p_labeled)
    assert_same_state(doubled, pooled)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_daw_reduce_pools_another_process(variant):
    gen = torch.Generator().manual_seed(3)
    probs = torch.randn(4, 3, 6, 5, generator=gen).mul(2).softmax(dim=1)
    labels = torch.randint(0, 3, (4, 6, 5), generator=gen)
    labels[0, :2] = 255
    unlabeled = torch.randn(4, 3, 6, 5, generator=gen).mul(2).softmax(dim=1)
    valid = torch.rand(4, 6, 5, generator=gen) > 0.2

    captured: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        captured.append(t.clone())
        return t

    # "Process 1" sees the second half of each batch; its statistics are what an all-reduce
    # would add to process 0's.
    other = DAWeighting(3, momentum=0.5, variant=variant, reduce=record)
    run_policy(other, (probs[2:], labels[2:]), unlabeled[2:], valid[2:])
    replies = iter(captured)
    first = DAWeighting(3, momentum=0.5, variant=variant, reduce=lambda t: t + next(replies))
    out = run_policy(first, (probs[:2], labels[:2]), unlabeled[:2], valid[:2])

    whole = DAWeighting(3, momentum=0.5, variant=variant)
    out_whole = run_policy(whole, (probs, labels), unlabeled, valid)
    assert_same_state(first, whole)
    torch.testing.assert_close(out.confidence, out_whole.confidence[:2])
    assert torch.equal(out.target, out_whole.target[:2])
    assert torch.equal(out.weight, out_whole.weight[:2])


def test_daw_validates_arguments():
    with pytest.raises(ValueError):
        DAWeighting(3, variant="other")
    with pytest.raises(ValueError):
        DAWeighting(3, momentum=1.5)
    policy = DAWeighting(3)
    with pytest.raises(ValueError):
        policy(torch.rand(1, 4, 2, 2).softmax(dim=1))
    with pytest.raises(ValueError):
        policy(torch.rand(1, 3, 2, 2).softmax(dim=1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError):
        policy.update(torch.rand(1, 3, 2, 2).softmax(dim=1), torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_daw_cuda_matches_cpu(variant):
    gen = torch.Generator().manual_seed(4)
    probs = torch.randn(2, 3, 8, 8, generator=gen).mul(2).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 8, 8), generator=gen)
    unlabeled = torch.randn(2, 3, 8, 8, generator=gen).mul(2).softmax(dim=1)
    cpu = DAWeighting(3, momentum=0.5, variant=variant)
    gpu = DAWeighting(3, momentum=0.5, variant=variant)
    out_cpu = run_policy(cpu, (probs, labels), unlabeled)
    out_gpu = run_policy(gpu, (probs.cuda(), labels.cuda()), unlabeled.cuda())
    assert out_gpu.weight.is_cuda and gpu.p_unlabeled.is_cuda
    torch.testing.assert_close(out_gpu.confidence.cpu(), out_cpu.confidence)
    assert torch.equal(out_gpu.target.cpu(), out_cpu.target)
    assert gpu.threshold == pytest.approx(cpu.threshold, rel=1e-6)
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.p_labeled.device.type == "cpu"
    gpu(unlabeled.cuda())
    assert gpu.p_labeled.is_cuda


# ---------------------------------------------------------------------------------------
# stateless policies and helpers

# Confidences 0.5, 0.96, 0.7 (class 1, 0, 2) and one padding pixel.
SIMPLE = torch.tensor([[0.3, 0.96, 0.1, 0.4], [0.5, 0.02, 0.2, 0.3], [0.2, 0.02, 0.7, 0.3]]).view(
    1, 3, 1, 4
)
SIMPLE_VALID = torch.tensor([[[True, True, True, False]]])


def test_constant_policy():
    pl = ConstantPolicy(3)(SIMPLE, SIMPLE_VALID)
    assert pl.weight.tolist() == [[[1.0, 1.0, 1.0, 0.0]]]
    assert pl.target.tolist() == [[[1, 0, 2, 255]]]
    torch.testing.assert_close(pl.confidence, torch.tensor([[[0.5, 0.96, 0.7, 0.4]]]))


def test_threshold_policy():
    assert ThresholdPolicy(3, threshold=0.7)(SIMPLE, SIMPLE_VALID).weight.tolist() == [
        [[0.0, 1.0, 1.0, 0.0]]
    ]
    assert ThresholdPolicy(3)(SIMPLE).weight.tolist() == [[[0.0, 1.0, 0.0, 0.0]]]
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError):
            ThresholdPolicy(3, threshold=bad)


def test_power_policy():
    raw = PowerPolicy(3, normalize=False)(SIMPLE, SIMPLE_VALID).weight
    torch.testing.assert_close(raw, torch.tensor([[[0.25, 0.9216, 0.49, 0.0]]]))
    cubed = PowerPolicy(3, power=3.0, normalize=False)(SIMPLE).weight
    torch.testing.assert_close(cubed, torch.tensor([[[0.125, 0.884736, 0.343, 0.064]]]))
    normalized = PowerPolicy(3)(SIMPLE, SIMPLE_VALID).weight
    mean = (0.25 + 0.9216 + 0.49) / 3  # over the three valid pixels only
    torch.testing.assert_close(normalized, torch.tensor([[[0.25, 0.9216, 0.49, 0.0]]]) / mean)
    with pytest.raises(ValueError):
        PowerPolicy(3, power=-1.0)


def test_stateless_policies_have_trivial_state_and_accept_half():
    policy = ThresholdPolicy(3, threshold=0.7)
    assert policy.diagnostics() == {}
    policy.update(SIMPLE, torch.zeros(1, 1, 4, dtype=torch.long))
    copy = ThresholdPolicy(3)
    copy.load_state_dict(policy.state_dict())
    with pytest.raises(ValueError):
        ThresholdPolicy(4).load_state_dict(policy.state_dict())
    pl = policy(SIMPLE.half(), SIMPLE_VALID)
    assert pl.weight.dtype == pl.confidence.dtype == torch.float32


def test_helpers():
    pl = ThresholdPolicy(3, threshold=0.7)(SIMPLE, SIMPLE_VALID)
    assert used_fraction(pl) == pytest.approx(2 / 3)
    assert used_fraction(pl, torch.tensor([[[True, True, False, False]]])) == pytest.approx(0.5)
    soft = PowerPolicy(3, normalize=False)(SIMPLE, SIMPLE_VALID)
    assert mean_weight(soft) == pytest.approx((0.25 + 0.9216 + 0.49) / 3)
    empty = ConstantPolicy(3)(SIMPLE, torch.zeros(1, 1, 4, dtype=torch.bool))
    assert used_fraction(empty) == 0.0 and mean_weight(empty) == 0.0


def test_registry_and_build_policy():
    assert {name: POLICIES.get(name) for name in POLICIES.names()} == {
        "pseudo_label": ConstantPolicy,
        "threshold": ThresholdPolicy,
        "ael": PowerPolicy,
        "daw": DAWeighting,
        "rankweight": RankWeighting,
    }
    policy = build_policy("threshold", 5, threshold=0.8)
    assert isinstance(policy, ThresholdPolicy) and policy.threshold == 0.8
    daw = build_policy(
        "daw", 5, momentum=0.9, align=False, weighting=True, variant="official", reduce=None
    )
    assert isinstance(daw, DAWeighting) and daw.variant == "official" and daw.momentum == 0.9
    assert build_policy("ael", 5, power=3.0).power == 3.0
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy("nope", 5)
