"""Seed statistics shared by the bench table and the learning curves."""

from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a non-empty list."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_mean_se(diffs: list[float]) -> tuple[float | None, float | None]:
    """Mean of paired per-seed differences and its standard error, sample std / sqrt(n).

    The mean is None for no pairs and the error None below 2: one pair has no spread to
    estimate, and reporting 0 would read as certainty."""
    if not diffs:
        return None, None
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return statistics.mean(diffs), se


def unpaired_mean_se(
    values: list[float], baseline: list[float]
) -> tuple[float | None, float | None]:
    """Difference of two independent groups' means, mean(values) - mean(baseline), and its
    standard error sqrt(s_a^2 / n_a + s_b^2 / n_b) (Welch's, each group's sample variance).

    For a baseline trained at more seeds than the rows it is compared with: its mean is then
    known better than one pairing can use. The mean is None if either group is empty, the
    error None unless both have 2 values or more."""
    if not values or not baseline:
        return None, None
    gain = statistics.mean(values) - statistics.mean(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return gain, None
    se = (
        statistics.variance(values) / len(values) + statistics.variance(baseline) / len(baseline)
    ) ** 0.5
    return gain, se
