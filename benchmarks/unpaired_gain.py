"""Each row of a bench grid against its baseline row trained at more seeds: the gain over the
baseline's mean with Welch's standard error, on the last evaluation and on the mean over the
last fifth of the schedule.

    python benchmarks/unpaired_gain.py benchmarks/grids/camvid-1_16-cpu-v4.yaml \
        --baseline-seeds 0 1 2 3 4 5 6 7 8 9

The paired gain of `semiseg bench` pairs each row's seed with the baseline's same seed; it
removes a shared seed effect, if there is one, and carries the baseline run's own noise into
every pair. Where the rows' seed means are flat and the baseline's single runs spread by a
point or more (CamVid 1/16, v3), the baseline's mean over more seeds is the better reference.
The baseline's extra seeds are ordinary runs in the grid's run folder (a second grid with the
same base, overrides and output folder trains them, e.g. `grids/camvid-1_16-cpu-v4-supervised.yaml`).
Only finished runs are read.
"""

from __future__ import annotations

import argparse
import statistics

from semiseg.bench import RunResult, finished_result, load_grid
from semiseg.stats import mean_std, unpaired_mean_se


def finished(grid, method: str, seeds: list[int]) -> list[RunResult]:
    return [r for seed in seeds if (r := finished_result(grid, method, seed)) is not None]


def table(rows: dict[str, list[RunResult]], baseline: str, key: str) -> str:
    """One line per method: runs, mean ± std (points), gain over the baseline's mean ± Welch
    SE, and whether it exceeds two standard errors."""
    base = [100 * getattr(r, key) for r in rows[baseline] if getattr(r, key) is not None]
    lines = [
        f"| method | runs | mIoU (%) | gain over {baseline} ({len(base)} runs) ± SE | > 2 SE |",
        "|---|---:|---:|---:|:-:|",
    ]
    for method, runs in rows.items():
        values = [100 * getattr(r, key) for r in runs if getattr(r, key) is not None]
        if not values:
            continue
        mean, std = mean_std(values)
        if method == baseline:
            gain_cell, beyond = "-", "-"
        else:
            gain, se = unpaired_mean_se(values, base)
            gain_cell = (
                "-" if gain is None else f"{gain:+.2f} ± {'-' if se is None else f'{se:.2f}'}"
            )
            beyond = "-" if gain is None or se is None else ("yes" if gain > 2 * se else "no")
        lines.append(
            f"| {method} | {len(values)} | {mean:.2f} ± {std:.2f} | {gain_cell} | {beyond} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid")
    parser.add_argument(
        "--baseline-seeds",
        type=int,
        nargs="+",
        required=True,
        help="the seeds of the baseline row to read (its extra seeds included)",
    )
    parser.add_argument("--methods", nargs="+", help="default: every method of the grid")
    args = parser.parse_args(argv)

    grid = load_grid(args.grid)
    if grid.baseline is None:
        parser.error(f"{args.grid} names no baseline")
    rows = {grid.baseline: finished(grid, grid.baseline, args.baseline_seeds)}
    for method in args.methods or grid.methods:
        if method not in grid.methods:
            parser.error(f"unknown method {method!r}; the grid has {list(grid.methods)}")
        if method != grid.baseline:
            rows[method] = finished(grid, method, grid.seeds)
    base_seeds = [r.seed for r in rows[grid.baseline]]
    print(f"# {grid.name}: every row against {grid.baseline} at seeds {base_seeds} (unpaired)\n")
    print("## Last evaluation\n")
    print(table(rows, grid.baseline, "miou"))
    print("## Mean over the last fifth of the schedule\n")
    print(table(rows, grid.baseline, "last_fifth_miou"))
    spread = [100 * r.miou for r in rows[grid.baseline]]
    if len(spread) > 1:
        print(
            f"{grid.baseline}: single runs {min(spread):.2f} to {max(spread):.2f}, "
            f"std {statistics.stdev(spread):.2f}"
        )


if __name__ == "__main__":
    main()
