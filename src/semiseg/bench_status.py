"""`semiseg bench GRID --status`: where every run of a grid stands, and the training time left.

A grid at CPU scale trains for days over many sessions and machines; before starting or
resuming one, a user needs to know which runs are finished (in their run folder or only as
their record), which stopped part-way and at which step, whether one is being written right
now, and how long the rest takes at the speeds the logs measured. Nothing here trains or
writes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from semiseg.bench import (
    BenchGrid,
    finished_result,
    run_config,
    run_dir,
    weights_only_recorded,
)
from semiseg.metrics_log import format_duration, read_metrics
from semiseg.run_folder import RunFolder
from semiseg.schedule import planned_iterations

# A log written within this many seconds is reported as being written now: training logs
# every few seconds to a minute at the grids' log intervals.
_ACTIVE_SECONDS = 600
# The recent speed of a run: the median of its last logged training windows (a window is
# `train.log_every` steps), robust to the slow first window and to evaluation pauses.
_RECENT_WINDOWS = 10


@dataclass
class RunStatus:
    method: str
    seed: int
    state: str
    """'finished', 'finished (record)', 'stopped', 'writing', 'not started' or 'needs weights'
    (its warm start is a run that is here only as its record, `weights_only_recorded`)."""
    iteration: int
    planned: int
    miou: float | None
    """Last val mIoU (points) of the run's log, where it has evaluated."""
    sec_per_iter: float | None
    """The run's recent s/iter, or for a run without its own the median of its method's runs."""
    round_name: str | None = None
    """Self-training: the round folder the log is in."""
    idle_seconds: float | None = None
    """Seconds since the run's log was last written (unfinished runs)."""

    @property
    def left_seconds(self) -> float | None:
        if self.state.startswith("finished") or self.sec_per_iter is None:
            return None
        return (self.planned - self.iteration) * self.sec_per_iter


def _log_folder(folder: Path) -> tuple[RunFolder, str | None]:
    """The folder whose metrics.jsonl an unfinished run is writing: its last round folder for
    a self-training run, else the run folder itself."""
    rounds = sorted(
        (p for p in folder.glob("round[0-9]*") if (p / "metrics.jsonl").is_file()),
        key=lambda p: int(p.name[len("round") :]),
    )
    if rounds:
        return RunFolder(rounds[-1]), rounds[-1].name
    return RunFolder(folder), None


def _speed(records: list[dict]) -> float | None:
    times = [r["sec_per_iter"] for r in records if r["split"] == "train" and "sec_per_iter" in r]
    return statistics.median(times[-_RECENT_WINDOWS:]) if times else None


def run_status(grid: BenchGrid, method: str, seed: int, now: float | None = None) -> RunStatus:
    """One run's state, last logged iteration, last val mIoU and recent speed."""
    planned = planned_iterations(run_config(grid, method, seed))
    result = finished_result(grid, method, seed)
    if result is not None:
        in_folder = RunFolder(run_dir(grid, method, seed)).read_final() is not None
        return RunStatus(
            method,
            seed,
            "finished" if in_folder else "finished (record)",
            planned,
            planned,
            100 * result.miou,
            result.sec_per_iter,
        )
    log, round_name = _log_folder(run_dir(grid, method, seed))
    if not log.metrics.is_file():
        waits = weights_only_recorded(grid, method, seed)
        state = "not started"
        if waits:
            state = "needs weights of " + ", ".join(f"{m} seed {s}" for m, s, _ in waits)
        return RunStatus(method, seed, state, 0, planned, None, None)
    records = read_metrics(log.metrics)
    val = [r for r in records if r["split"] == "val"]
    idle = (time.time() if now is None else now) - log.metrics.stat().st_mtime
    return RunStatus(
        method,
        seed,
        "writing" if idle < _ACTIVE_SECONDS else "stopped",
        max((r["iteration"] for r in records), default=0),
        planned,
        100 * val[-1]["miou"] if val else None,
        _speed(records),
        round_name,
        idle,
    )


def grid_status(grid: BenchGrid, now: float | None = None) -> list[RunStatus]:
    """Every run of the grid; a run without a speed of its own (not started) takes the median
    speed of its method's other runs, so the time left covers it."""
    runs = [run_status(grid, m, s, now) for m in grid.methods for s in grid.seeds]
    for run in runs:
        if run.sec_per_iter is None:
            known = [r.sec_per_iter for r in runs if r.method == run.method and r.sec_per_iter]
            run.sec_per_iter = statistics.median(known) if known else None
    return runs


def status_table(grid: BenchGrid, runs: list[RunStatus]) -> str:
    """The runs as a Markdown table and a line with the training time left in all."""
    lines = [
        "| method | seed | state | iteration | last val mIoU (%) | s/iter | left |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        state = r.state
        if r.round_name:
            state += f", {r.round_name}"
        if r.idle_seconds is not None and r.state == "stopped":
            state += f", log idle {format_duration(r.idle_seconds)}"
        left = r.left_seconds
        lines.append(
            f"| {r.method} | {r.seed} | {state} | {r.iteration}/{r.planned} "
            f"| {'-' if r.miou is None else f'{r.miou:.2f}'} "
            f"| {'-' if r.sec_per_iter is None else f'{r.sec_per_iter:.2f}'} "
            f"| {'-' if left is None else format_duration(left)} |"
        )
    unfinished = [r for r in runs if not r.state.startswith("finished")]
    timed = [r.left_seconds for r in unfinished if r.left_seconds is not None]
    done = len(runs) - len(unfinished)
    summary = f"{done} of {len(runs)} runs finished"
    if unfinished:
        summary += (
            f"; {format_duration(sum(timed))} of training left for {len(timed)} of the other runs "
            "(evaluations not counted)"
        )
        untimed = [r.method for r in unfinished if r.left_seconds is None]
        if untimed:
            summary += (
                f"; no speed measured yet for {', '.join(dict.fromkeys(untimed))} "
                f"({len(untimed)} runs)"
            )
    if grid.records:
        summary += f"; records in {grid.records}"
    return "\n".join(lines) + f"\n\n{summary}.\n"
