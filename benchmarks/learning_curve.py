"""Learning curves of a bench grid: val mIoU against iterations per method (mean ± std over
seeds), the paired gain over the baseline at each evaluation (± its standard error), each
run against its baseline run of the same seed over all their evaluations, and how much each
run still rose over the last fifth of its schedule (convergence); `--seed-tables EVERY` adds
each seed's curves side by side.

    python benchmarks/learning_curve.py benchmarks/grids/camvid-1_16-cpu.yaml \
        --methods fixmatch unimatch --plot benchmarks/results/camvid-1_16-cpu/learning_curve.png

Reads only finished evaluations, so it also reports a grid that is still training. The
curve of a run is its own schedule's evaluations (see semiseg.curves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semiseg.bench import load_grid, log_dir, run_config
from semiseg.curves import pair_summary, paired_curve, rise_over_tail, val_curve
from semiseg.schedule import planned_iterations


def _pm(value: float | None, spread: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f} ± {'-' if spread is None else f'{spread:.2f}'}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid")
    parser.add_argument("--methods", nargs="+", help="default: every method of the grid")
    parser.add_argument("--baseline", help="default: the grid's baseline")
    parser.add_argument("--key", default="miou", help="val metric: miou or tail_miou")
    parser.add_argument("--plot", type=Path, help="write the gain curves to this PNG")
    parser.add_argument(
        "--seed-tables",
        type=int,
        metavar="EVERY",
        help="also print each seed's curves side by side, every EVERY iterations",
    )
    args = parser.parse_args(argv)

    grid = load_grid(args.grid)
    baseline = args.baseline or grid.baseline
    methods = args.methods or list(grid.methods)
    curves = {
        m: {s: c for s in grid.seeds if (c := val_curve(log_dir(grid, m, s), args.key))}
        for m in methods + [baseline]
    }
    print(f"# {grid.name}: val {args.key} (%) against iterations, paired over seeds\n")
    for method in methods:
        if method == baseline or not curves[method]:
            continue
        print(f"## {method} against {baseline}\n")
        print(f"| iteration | {baseline} | {method} | paired gain ± SE | pairs |")
        print("|---:|---:|---:|---:|---:|")
        base_points = {p.iteration: p for p in paired_curve(curves[baseline], None)}
        for p in paired_curve(curves[method], curves[baseline]):
            b = base_points.get(p.iteration)
            base = f"{b.mean:.2f} ± {b.std:.2f}" if b else "-"
            print(
                f"| {p.iteration} | {base} | {p.mean:.2f} ± {p.std:.2f} "
                f"| {_pm(p.gain, p.se)} | {p.pairs} |"
            )
        print()
    _print_pairs(grid, curves, baseline, methods)
    if args.seed_tables:
        _print_seed_tables(grid.seeds, curves, [baseline, *methods], args.seed_tables)
    print("## Rise over the last fifth of the schedule (points; last eval minus the one at 80 %)\n")
    print("| method | " + " | ".join(f"seed {s}" for s in grid.seeds) + " |")
    print("|---|" + "---:|" * len(grid.seeds))
    for method in dict.fromkeys([baseline, *methods]):
        cells = []
        for seed in grid.seeds:
            length = planned_iterations(run_config(grid, method, seed))
            rise = rise_over_tail(curves[method].get(seed, {}), length)
            cells.append(_signed(rise))
        print(f"| {method} | " + " | ".join(cells) + " |")
    if args.plot:
        _plot(grid.name, curves, baseline, methods, args.key, args.plot)
        print(f"\nplot: {args.plot}")


def _print_pairs(grid, curves, baseline, methods) -> None:
    print(f"## Each run against its {baseline} pair (same seed, shared evaluations)\n")
    print(
        "| method | seed | evaluations | below its pair | mean gain | gain from the midpoint "
        "| last-fifth gain |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in methods:
        if method == baseline:
            continue
        for seed, curve in sorted(curves[method].items()):
            length = planned_iterations(run_config(grid, method, seed))
            summary = pair_summary(curve, curves[baseline].get(seed, {}), length)
            if summary is None:
                continue
            print(
                f"| {method} | {seed} | {summary.evaluations} | {summary.below} "
                f"| {summary.mean_gain:+.2f} | {_signed(summary.late_gain)} "
                f"| {_signed(summary.tail_gain)} |"
            )
    print()


def _print_seed_tables(seeds, curves, methods, every: int) -> None:
    for seed in seeds:
        rows = {m: curves[m][seed] for m in dict.fromkeys(methods) if seed in curves[m]}
        if not rows:
            continue
        iterations = sorted({i for c in rows.values() for i in c if i % every == 0})
        print(f"## Seed {seed}, every {every} iterations\n")
        print("| method | " + " | ".join(f"{i:,}" for i in iterations) + " |")
        print("|---|" + "---:|" * len(iterations))
        for method, curve in rows.items():
            cells = [f"{curve[i]:.2f}" if i in curve else "-" for i in iterations]
            print(f"| {method} | " + " | ".join(cells) + " |")
        print()


def _plot(name, curves, baseline, methods, key, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semiseg.files import atomic_write

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    # One colour per method in both panels, so a gain curve reads against its own mIoU curve.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(dict.fromkeys([baseline, *methods])):
        if not curves[method]:
            continue
        style = {"capsize": 3, "label": method, "color": cycle[index % len(cycle)]}
        points = paired_curve(curves[method], curves[baseline])
        xs = [p.iteration for p in points]
        left.errorbar(xs, [p.mean for p in points], yerr=[p.std for p in points], **style)
        if method != baseline:
            gains = [(p.iteration, p.gain, p.se or 0.0) for p in points if p.gain is not None]
            if gains:
                x, g, e = zip(*gains, strict=True)
                right.errorbar(x, g, yerr=[2 * v for v in e], **style)
    left.set(xlabel="iteration", ylabel=f"val {key} (%)", title=f"{name}: mean ± std over seeds")
    right.axhline(0.0, color="grey", linewidth=1)
    right.set(xlabel="iteration", ylabel=f"paired gain over {baseline}", title="paired gain ± 2 SE")
    left.legend()
    if right.get_legend_handles_labels()[0]:
        right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
