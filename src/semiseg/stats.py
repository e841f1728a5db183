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
