import math

import pytest

from semiseg.stats import mean_std, paired_mean_se, unpaired_mean_se


def test_mean_std_by_hand():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_paired_mean_se_by_hand():
    # diffs 1, 2, 3: sample std 1, so the error is 1 / sqrt(3).
    mean, se = paired_mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert se == pytest.approx(1 / math.sqrt(3))
    assert paired_mean_se([0.5]) == (0.5, None)
    assert paired_mean_se([]) == (None, None)


def test_unpaired_mean_se_by_hand():
    # Means 3 and 1: gain 2. Sample variances 1 (n = 3) and (1 + 0 + 0 + 1) / 3 = 2/3
    # (n = 4): se = sqrt(1/3 + (2/3)/4) = sqrt(1/2).
    gain, se = unpaired_mean_se([2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 2.0])
    assert gain == pytest.approx(2.0)
    assert se == pytest.approx(math.sqrt(0.5))
    assert unpaired_mean_se([1.0], [0.0, 2.0]) == (0.0, None)
    assert unpaired_mean_se([], [1.0, 2.0]) == (None, None)
