"""Validation curves of bench runs: paired gain against iterations, and whether a run has
converged. `benchmarks/learning_curve.py` prints and plots them for a grid.

A curve is a run's val mIoU (points) at each evaluation, read from its metrics log; the
evaluations of one run lie on its own schedule (poly decay to the configured length), so a
curve at 1,000 of 2,000 iterations is not a 1,000-iteration run, only its midpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from semiseg.metrics_log import read_metrics
from semiseg.run_folder import RunFolder
from semiseg.stats import mean_std, paired_mean_se

Curve = dict[int, float]
"""Evaluation iteration -> val mIoU in points."""


def val_curve(folder: str | Path, key: str = "miou") -> Curve:
    """The val curve of one run folder (empty if it has not evaluated yet); the last
    evaluation at an iteration wins (a resumed run may evaluate the same step twice)."""
    run = RunFolder(folder)
    if not run.metrics_folder().metrics.is_file():
        return {}
    records = read_metrics(run.metrics_folder().metrics)
    return {r["iteration"]: 100 * r[key] for r in records if r["split"] == "val" and key in r}


@dataclass
class CurvePoint:
    iteration: int
    mean: float
    std: float
    gain: float | None
    """Mean over paired seeds of (run - baseline) at this iteration, in points."""
    se: float | None
    """Standard error of that mean (None below 2 pairs)."""
    pairs: int


def paired_curve(runs: dict[int, Curve], baseline: dict[int, Curve] | None) -> list[CurvePoint]:
    """Per evaluation iteration: mean ± std of `runs` (seed -> curve) over the seeds that
    reached it, and the paired gain over `baseline` (seed -> curve) over the seeds both
    reached, with its standard error."""
    iterations = sorted({i for curve in runs.values() for i in curve})
    points = []
    for i in iterations:
        values = [curve[i] for curve in runs.values() if i in curve]
        mean, std = mean_std(values)
        diffs = [
            curve[i] - baseline[seed][i]
            for seed, curve in runs.items()
            if i in curve and baseline and seed in baseline and i in baseline[seed]
        ]
        gain, se = paired_mean_se(diffs)
        points.append(CurvePoint(i, mean, std, gain, se, len(diffs)))
    return points


def rise_over_tail(curve: Curve, length: int, fraction: float = 0.2) -> float | None:
    """How much val mIoU (points) rose over the last `fraction` of a `length`-iteration
    schedule: the last evaluation minus the last one at or before (1 - fraction) * length.
    None unless the run evaluated at its end and before that tail. A converged run's rise is
    within its evaluation noise."""
    start = (1 - fraction) * length
    before = [i for i in curve if i <= start]
    if length not in curve or not before:
        return None
    return curve[length] - curve[max(before)]


def mean_over_tail(curve: Curve, length: int, fraction: float = 0.2) -> float | None:
    """Mean val mIoU (points) of the evaluations in the last `fraction` of a `length`-iteration
    schedule, the evaluation at (1 - fraction) * length and the final one included. None
    unless the run evaluated at its end. A single evaluation of these small val sets swings by
    a point or more around its run's plateau; the mean over the tail's evaluations is the
    plateau with less of that swing."""
    if length not in curve:
        return None
    start = (1 - fraction) * length
    values = [v for i, v in curve.items() if start <= i <= length]
    return sum(values) / len(values)


@dataclass
class PairSummary:
    """One run's curve against its baseline pair (same seed), over the evaluations both
    logged. A single final evaluation swings by a point or more; these say whether a run was
    below its pair all along or only at the end."""

    evaluations: int
    below: int
    """Evaluations at which the run is below its pair."""
    mean_gain: float
    """Mean of (run - pair) over the shared evaluations, in points."""
    late_gain: float | None
    """The same over the shared evaluations from the schedule's midpoint on."""
    tail_gain: float | None
    """Mean over the last fifth of the run minus that of its pair (`mean_over_tail`)."""


def pair_summary(curve: Curve, pair: Curve, length: int) -> PairSummary | None:
    """`curve` against `pair` (the baseline of the same seed) on a `length`-iteration
    schedule; None if they share no evaluation."""
    shared = set(curve) & set(pair)
    if not shared:
        return None
    gains = {i: curve[i] - pair[i] for i in shared}
    late = [g for i, g in gains.items() if i >= length / 2]
    run_tail, pair_tail = mean_over_tail(curve, length), mean_over_tail(pair, length)
    return PairSummary(
        evaluations=len(shared),
        below=sum(g < 0 for g in gains.values()),
        mean_gain=sum(gains.values()) / len(gains),
        late_gain=sum(late) / len(late) if late else None,
        tail_gain=None if run_tail is None or pair_tail is None else run_tail - pair_tail,
    )
