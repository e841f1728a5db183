"""`semiseg bench GRID`: run methods x seeds on one dataset and tabulate them against a baseline.

A grid file names a base config, the methods as lists of dotted overrides, and the seeds:

    name: camvid-1_8-cpu
    base: configs/supervised_deeplabv3plus-effl0_camvid-1_8_cpu.yaml
    output_dir: runs/bench/camvid-1_8-cpu
    seeds: [0, 1]
    baseline: supervised
    methods:
      supervised: []
      fixmatch: [scheme.name=fixmatch, policy.name=threshold]
      unimatch: [scheme.name=unimatch, policy.name=threshold]
      unimatch-daw: [scheme.name=unimatch, policy.name=daw]
    compare:
      unimatch-daw: unimatch

A grid may take its rows from another (``rows_from: other-grid.yaml``: its methods, seeds,
baseline, compare and overrides, each unless given here) and differ in base config and
output folder, e.g. the same rows at GPU scale. ``{output_dir}`` in an override is the
grid's output folder, so a row can start from another row's checkpoint in either grid.

Gains are paired: a row's gain over the baseline is the mean over the seeds both finished of
the per-seed difference, with its standard error (the seeds share the split and the initial
weights, so the pairing removes the seed's own luck). ``compare`` names, for a paper's
method, the baseline its paper compares it with; the table adds that paired gain too.

Each run lives in OUTPUT_DIR/METHOD/seedN. A finished run (final.json at the configured
iteration count) is read, not retrained; an unfinished one resumes from its checkpoint.
``{seed}`` in an override is replaced by the run's seed and ``{next_seed}`` by the grid's
next seed (cyclically): a two-student scheme warm-started from per-seed burn-ins can start its
second student from another seed's burn-in (``model.init_from=[.../seed{seed}/latest.pt,
.../seed{next_seed}/latest.pt]``), keeping its students differently initialised. ``--methods``/``--seeds`` restrict
which runs this process trains (e.g. one process per GPU); the table (markdown + CSV) and a
bar plot (OUTPUT_DIR/NAME.md, .csv, .png) always cover every finished run of the grid, with
the seed count per row. Grids may share OUTPUT_DIR: a method with the same overrides in two
grids is the same run, trained once.

``records`` (optional) names a folder that keeps a copy of each finished run's record: its
config, final scores, metrics log and machine log (`RunFolder.record_files`), no weights, in
RECORDS/METHOD/seedN, copied as each run finishes, plus the table's Markdown and CSV. Commit
it (e.g. under benchmarks/results/) and a new machine, or a colleague's clone, loses no
finished run: a run whose folder is gone is read from its record for the table and the
curves, and is not trained again (nor is a partial run of it resumed). Its weights are not
in the record, so a row that starts from its checkpoint (``model.init_from``) stops with an
error that says how to rebuild it. ``semiseg bench GRID --status`` (`semiseg.bench_status`)
shows where every run stands.

The table reports each run's last evaluation. A second table gives the same comparisons on
the mean of each run's evaluations over the last fifth of its schedule
(`semiseg.curves.mean_over_tail`): a single evaluation is one draw around the run's plateau,
and that draw's noise enters every paired gain.
"""

from __future__ import annotations

import csv
import filecmp
import io
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from semiseg.config import ConfigError, build_dataclass, load_config
from semiseg.curves import mean_over_tail
from semiseg.environment import machine_label
from semiseg.files import atomic_write, atomic_write_text
from semiseg.metrics_log import read_metrics
from semiseg.options import did_you_mean
from semiseg.run_folder import RunFolder
from semiseg.schedule import planned_iterations
from semiseg.stats import mean_std, paired_mean_se


@dataclass
class BenchGrid:
    name: str
    base: str
    output_dir: str
    methods: dict[str, list[str]]
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str | None = "supervised"
    overrides: list[str] = field(default_factory=list)
    """Overrides applied to every run (before each method's own)."""
    compare: dict[str, str] = field(default_factory=dict)
    """Method -> the baseline its paper compares it with (paired gain in the table)."""
    records: str | None = None
    """Folder that keeps each finished run's record (module docstring)."""


_ROW_KEYS = ("methods", "seeds", "baseline", "compare", "overrides")


def load_grid(path: str | Path) -> BenchGrid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid must be a mapping")
    if "rows_from" in data:
        source = Path(str(data.pop("rows_from")))
        if not source.is_file():
            raise ConfigError(f"{path}: rows_from: grid file not found: {source}")
        rows = yaml.safe_load(source.read_text()) or {}
        if not isinstance(rows, dict) or "rows_from" in rows:
            raise ConfigError(f"{path}: rows_from: {source} must be a grid without rows_from")
        data = {**{k: rows[k] for k in _ROW_KEYS if k in rows}, **data}
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{path}: 'methods' must map method names to lists of overrides")
    data = {**data, "methods": {str(k): v if v is not None else [] for k, v in methods.items()}}
    try:
        grid = build_dataclass(BenchGrid, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for method, overrides in grid.methods.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: methods.{method} must be a list of key=value strings")
    if grid.baseline is not None and grid.baseline not in grid.methods:
        raise ConfigError(
            f"{path}: baseline {grid.baseline!r} is not one of the methods {list(grid.methods)}"
        )
    for method, own in grid.compare.items():
        for name in (method, own):
            if name not in grid.methods:
                raise ConfigError(
                    f"{path}: compare.{method}: {name!r} is not one of the methods {list(grid.methods)}"
                )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", grid.name):
        raise ConfigError(
            f"{path}: name {grid.name!r} names the table files: use letters, digits, '.', '_', '-'"
        )
    if not grid.seeds:
        raise ConfigError(f"{path}: seeds must not be empty")
    return grid


@dataclass
class RunResult:
    method: str
    seed: int
    miou: float
    tail_miou: float | None
    sec_per_iter: float
    iterations: int
    kl: float | None = None
    """Self-training runs: KL divergence of the last round's pseudo labels to the labeled
    class distribution."""
    machines: tuple[str, ...] = ()
    """`environment.machine_label` of each machine the run's training log was written on, in
    order (two where a resume moved it); empty for runs from before the record existed."""
    last_fifth_miou: float | None = None
    """Mean val mIoU (fraction, like `miou`) of the evaluations over the last fifth of the
    schedule, the final one included."""


def run_dir(grid: BenchGrid, method: str, seed: int) -> Path:
    return Path(grid.output_dir) / method / f"seed{seed}"


def record_dir(grid: BenchGrid, method: str, seed: int) -> Path | None:
    """Where the grid keeps the run's record; None for a grid without ``records``."""
    return Path(grid.records) / method / f"seed{seed}" if grid.records else None


def log_dir(grid: BenchGrid, method: str, seed: int) -> Path:
    """The folder to read the run's logs from: the one `finished_result` reads (the run
    folder, else the record) for a finished run, the run folder for any other."""
    folder = run_dir(grid, method, seed)
    record = record_dir(grid, method, seed)
    if RunFolder(folder).final.is_file() or record is None:
        return folder
    return record if RunFolder(record).final.is_file() else folder


def read_result(method: str, seed: int, folder: Path, iterations: int) -> RunResult | None:
    """The result of a finished run, or None if the run has not reached `iterations`."""
    run = RunFolder(folder)
    final = run.read_final() or {}
    if final.get("iteration") != iterations:
        return None
    # A multi-round self-training run keeps its last round's log in a round folder.
    log = run.metrics_folder()
    records = read_metrics(log.metrics)
    machines = tuple(dict.fromkeys(machine_label(e) for e in log.read_environments()))
    val = [r for r in records if r["split"] == "val"]
    # The first window includes data-loader start-up; the median is robust to it.
    times = [r["sec_per_iter"] for r in records if r["split"] == "train" and "sec_per_iter" in r]
    # Keyed by iteration: a resumed run may evaluate the same step twice, the last one wins.
    curve = {r["iteration"]: r["miou"] for r in val}
    return RunResult(
        method,
        seed,
        val[-1]["miou"],
        val[-1].get("tail_miou"),
        statistics.median(times),
        iterations,
        final.get("kl"),
        machines,
        mean_over_tail(curve, iterations),
    )


def keep_record(grid: BenchGrid, method: str, seed: int) -> int:
    """Copy the finished run's `RunFolder.record_files` into its record folder, each
    atomically and only where it changed; returns the number of files written."""
    source, target = run_dir(grid, method, seed), record_dir(grid, method, seed)
    if target is None:
        return 0
    written = 0
    for path in RunFolder(source).record_files():
        dest = target / path.relative_to(source)
        if dest.is_file() and filecmp.cmp(path, dest, shallow=False):
            continue
        atomic_write(dest, lambda tmp, path=path: shutil.copyfile(path, tmp))
        written += 1
    return written


def run_config(grid: BenchGrid, method: str, seed: int):
    """The config of one run; ``{seed}`` in an override value becomes the run's seed (e.g. a
    per-seed ``model.init_from`` checkpoint), ``{next_seed}`` the grid's next seed and
    ``{output_dir}`` the grid's output folder."""
    following = (
        grid.seeds[(grid.seeds.index(seed) + 1) % len(grid.seeds)] if seed in grid.seeds else seed
    )
    overrides = [
        o.replace("{seed}", str(seed))
        .replace("{next_seed}", str(following))
        .replace("{output_dir}", grid.output_dir)
        for o in [*grid.overrides, *grid.methods[method]]
    ]
    return load_config(
        grid.base, [*overrides, f"train.seed={seed}", f"output_dir={run_dir(grid, method, seed)}"]
    )


def _check_selection(grid: BenchGrid, methods: list[str] | None, seeds: list[int] | None) -> None:
    unknown = [m for m in methods or [] if m not in grid.methods]
    if unknown:
        raise ConfigError(
            f"unknown method(s) {unknown}; the grid has {list(grid.methods)}"
            + did_you_mean(unknown[0], grid.methods)
        )
    missing = [s for s in seeds or [] if s not in grid.seeds]
    if missing:
        raise ConfigError(f"seed(s) {missing} are not in the grid's seeds {grid.seeds}")


def run_grid(
    grid: BenchGrid,
    progress: bool = True,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[RunResult]:
    """Train (or resume) every selected run that has not finished; return the results of all
    finished runs of the grid, selected or not, so several processes can share one grid."""
    from semiseg.training import train

    _check_selection(grid, methods, seeds)
    for method in methods or grid.methods:
        for seed in seeds or grid.seeds:
            folder = run_dir(grid, method, seed)
            cfg = run_config(grid, method, seed)
            iterations = planned_iterations(cfg)
            record = record_dir(grid, method, seed)
            if read_result(method, seed, folder, iterations) is not None:
                print(f"== {method} seed {seed}: finished, read from {folder}")
            elif record is not None and read_result(method, seed, record, iterations) is not None:
                print(f"== {method} seed {seed}: finished, read from its record {record}")
                continue
            else:
                _check_warm_start(grid, method, seed)
                print(f"== {method} seed {seed} -> {folder}")
                train(cfg, progress=progress)
                if read_result(method, seed, folder, iterations) is None:
                    raise RuntimeError(f"{folder}: training ended without a final evaluation")
            keep_record(grid, method, seed)
    return finished_results(grid)


def weights_only_recorded(grid: BenchGrid, method: str, seed: int) -> list[tuple[str, int, Path]]:
    """The runs of the grid (method, seed, record folder) whose checkpoint this run starts
    from (``model.init_from``) but that are here only as their record: they finished on
    another machine and their weights are gone, so this run cannot start until they are
    trained again here."""
    init_from = run_config(grid, method, seed).model.init_from
    missing = []
    for path in [init_from] if isinstance(init_from, str) else init_from or []:
        if Path(path).is_file():
            continue
        for other in grid.methods:
            for other_seed in grid.seeds:
                record = record_dir(grid, other, other_seed)
                if (
                    record is not None
                    and Path(path).is_relative_to(run_dir(grid, other, other_seed))
                    and RunFolder(record).final.is_file()
                ):
                    missing.append((other, other_seed, record))
    return missing


def _check_warm_start(grid: BenchGrid, method: str, seed: int) -> None:
    """Refuse, before training, a run whose warm start is a recorded run's lost weights."""
    for other, other_seed, record in weights_only_recorded(grid, method, seed):
        raise ConfigError(
            f"{method} seed {seed}: model.init_from needs the weights of {other} seed "
            f"{other_seed}, which finished elsewhere: only its record ({record}, no weights) is "
            f"here. Train it again here first (its record then becomes the new run's): "
            f"semiseg train {RunFolder(record).config} "
            f"output_dir={run_dir(grid, other, other_seed)}"
        )


def finished_result(grid: BenchGrid, method: str, seed: int) -> RunResult | None:
    """The run's result from its run folder, or from its record where the run folder does
    not hold the finished run."""
    iterations = planned_iterations(run_config(grid, method, seed))
    result = read_result(method, seed, run_dir(grid, method, seed), iterations)
    record = record_dir(grid, method, seed)
    if result is None and record is not None:
        result = read_result(method, seed, record, iterations)
    return result


def finished_results(grid: BenchGrid) -> list[RunResult]:
    return [
        result
        for method in grid.methods
        for seed in grid.seeds
        if (result := finished_result(grid, method, seed)) is not None
    ]


def keep_records(grid: BenchGrid) -> int:
    """`keep_record` for every finished run in the grid's run folders; returns the number of
    files written."""
    return sum(
        keep_record(grid, method, seed)
        for method in grid.methods
        for seed in grid.seeds
        if read_result(
            method,
            seed,
            run_dir(grid, method, seed),
            planned_iterations(run_config(grid, method, seed)),
        )
        is not None
    )


def paired_gain(
    results: list[RunResult], method: str, baseline: str, key: str = "miou"
) -> tuple[float | None, float | None, int]:
    """Mean per-seed mIoU difference (points) of `method` over `baseline`, its standard error
    (sample std / sqrt(n); None below 2 pairs) and the number n of seeds both finished. `key`
    is the RunResult field compared (`miou`, or `last_fifth_miou`; runs without it are left
    out of the pairs)."""
    base = {r.seed: getattr(r, key) for r in results if r.method == baseline}
    diffs = [
        100 * (getattr(r, key) - base[r.seed])
        for r in results
        if r.method == method and base.get(r.seed) is not None and getattr(r, key) is not None
    ]
    gain, se = paired_mean_se(diffs)
    return gain, se, len(diffs)


def summarize(grid: BenchGrid, results: list[RunResult]) -> list[dict]:
    """One row per method: mean and spread over seeds, gain over the baseline's mean, paired
    gains (with standard errors) over the baseline and over the method's own baseline."""
    rows = []
    for method in grid.methods:
        runs = [r for r in results if r.method == method]
        if not runs:
            continue
        miou, spread = mean_std([100 * r.miou for r in runs])
        tails = [100 * r.tail_miou for r in runs if r.tail_miou is not None]
        # Runs recorded before dars.kl_divergence clamped at 0 hold about -1e-11 at the target.
        kls = [max(r.kl, 0.0) for r in runs if r.kl is not None]
        fifths = [100 * r.last_fifth_miou for r in runs if r.last_fifth_miou is not None]
        fifth, fifth_spread = mean_std(fifths) if fifths else (None, None)
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "miou": miou,
                "miou_std": spread,
                "tail_miou": statistics.mean(tails) if tails else None,
                "sec_per_iter": statistics.mean(r.sec_per_iter for r in runs),
                "iterations": runs[0].iterations,
                "kl": statistics.mean(kls) if kls else None,
                "last_fifth_miou": fifth,
                "last_fifth_std": fifth_spread,
                "last_fifth_seeds": len(fifths),
            }
        )
    base = next((r for r in rows if r["method"] == grid.baseline), None)
    for row in rows:
        row["gain"] = row["miou"] - base["miou"] if base else None
        row["tail_gain"] = (
            row["tail_miou"] - base["tail_miou"]
            if base and row["tail_miou"] is not None and base["tail_miou"] is not None
            else None
        )
        gain, se, n = (
            paired_gain(results, row["method"], grid.baseline)
            if base and row is not base
            else (None, None, 0)
        )
        row.update(paired_gain=gain, paired_se=se, paired_seeds=n)
        gain, se, n = (
            paired_gain(results, row["method"], grid.baseline, "last_fifth_miou")
            if base and row is not base
            else (None, None, 0)
        )
        row.update(last_fifth_gain=gain, last_fifth_se=se, last_fifth_pairs=n)
        own = grid.compare.get(row["method"])
        gain, se, n = paired_gain(results, row["method"], own) if own else (None, None, 0)
        row.update(own_baseline=own, own_gain=gain, own_se=se, own_seeds=n)
        gain, se, n = (
            paired_gain(results, row["method"], own, "last_fifth_miou") if own else (None, None, 0)
        )
        row.update(own_last_fifth_gain=gain, own_last_fifth_se=se, own_last_fifth_pairs=n)
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _fmt_paired(gain: float | None, se: float | None, n: int) -> str:
    if gain is None:
        return "-"
    return f"{gain:+.2f} ± {'-' if se is None else f'{se:.2f}'} ({n})"


def _beyond_two_se(gain: float | None, se: float | None) -> str:
    if gain is None or se is None:
        return "-"
    return "yes" if gain > 2 * se else "no"


def markdown_table(grid: BenchGrid, rows: list[dict]) -> str:
    """The comparison table: mean ± std over seeds, the paired gain over the baseline ± its
    standard error (seeds paired), whether it exceeds two standard errors, and the paired gain
    over the method's own baseline where the grid names one. A KL column (pseudo labels vs
    labeled class distribution, self-training runs) appears when some row has it."""
    with_kl = any(r.get("kl") is not None for r in rows)
    with_own = any(r.get("own_baseline") for r in rows)
    lines = [
        f"| method | seeds | mIoU (%) | tail mIoU (%) | paired gain over {grid.baseline} ± SE (pairs) "
        "| > 2 SE | tail gain |"
        + (" vs own baseline ± SE (pairs) |" if with_own else "")
        + " s/iter |"
        + (" KL |" if with_kl else ""),
        "|---|---:|---:|---:|---:|:-:|---:|"
        + ("---:|" if with_own else "")
        + "---:|"
        + ("---:|" if with_kl else ""),
    ]
    for r in rows:
        kl = r.get("kl")
        own = (
            f" {r['own_baseline']}: {_fmt_paired(r['own_gain'], r['own_se'], r['own_seeds'])} |"
            if r.get("own_baseline")
            else " - |"
        )
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['miou']:.2f} ± {r['miou_std']:.2f} "
            f"| {_fmt(r['tail_miou'])} "
            f"| {_fmt_paired(r['paired_gain'], r['paired_se'], r['paired_seeds'])} "
            f"| {_beyond_two_se(r['paired_gain'], r['paired_se'])} "
            f"| {_fmt(r['tail_gain'], True)} |"
            + (own if with_own else "")
            + f" {r['sec_per_iter']:.2f} |"
            + (f" {'-' if kl is None else f'{kl:.4f}'} |" if with_kl else "")
        )
    return "\n".join(lines) + "\n"


def last_fifth_table(grid: BenchGrid, rows: list[dict]) -> str:
    """The main table's comparisons on each run's mean over the last fifth of its schedule.
    Empty when no run has one (no evaluation at its end)."""
    if not any(r["last_fifth_seeds"] for r in rows):
        return ""
    with_own = any(r.get("own_baseline") for r in rows)
    lines = [
        f"| method | seeds | mIoU, last fifth (%) | paired gain over {grid.baseline} ± SE (pairs) "
        "| > 2 SE |" + (" vs own baseline ± SE (pairs) |" if with_own else ""),
        "|---|---:|---:|---:|:-:|" + ("---:|" if with_own else ""),
    ]
    for r in rows:
        if not r["last_fifth_seeds"]:
            continue
        own = (
            f" {r['own_baseline']}: "
            f"{_fmt_paired(r['own_last_fifth_gain'], r['own_last_fifth_se'], r['own_last_fifth_pairs'])} |"
            if r.get("own_baseline")
            else " - |"
        )
        lines.append(
            f"| {r['method']} | {r['last_fifth_seeds']} "
            f"| {r['last_fifth_miou']:.2f} ± {r['last_fifth_std']:.2f} "
            f"| {_fmt_paired(r['last_fifth_gain'], r['last_fifth_se'], r['last_fifth_pairs'])} "
            f"| {_beyond_two_se(r['last_fifth_gain'], r['last_fifth_se'])} |"
            + (own if with_own else "")
        )
    return "\n".join(lines) + "\n"


def machines_table(results: list[RunResult]) -> str:
    """Which machine ran which run: the same command gives different results on different
    CPUs, so a table that pools machines has to say so. Empty when no run recorded its
    machine (runs from before `environment.jsonl`)."""
    if not any(r.machines for r in results):
        return ""
    by_machine: dict[str, list[str]] = {}
    for r in results:
        for machine in r.machines or ("not recorded",):
            by_machine.setdefault(machine, []).append(f"{r.method} {r.seed}")
    lines = ["| machine | runs (method seed) |", "|---|---|"]
    lines += [f"| {machine} | {', '.join(runs)} |" for machine, runs in by_machine.items()]
    return "\n".join(lines) + "\n"


def write_report(grid: BenchGrid, rows: list[dict], command: str, machines: str = "") -> Path:
    """The table, `last_fifth_table`'s (when some run has it) and `machines_table`'s (when
    given) as Markdown, the rows as CSV and a bar plot, in the grid's output folder; the
    Markdown and CSV also in its records folder."""
    out = Path(grid.output_dir)
    header = f"# {grid.name}\n\nBase config `{grid.base}`, seeds {grid.seeds}.\n\nCommand: `{command}`\n\n"
    fifth = last_fifth_table(grid, rows)
    body = markdown_table(grid, rows)
    if fifth:
        body += f"\nMean over each run's evaluations in the last fifth of its schedule:\n\n{fifth}"
    if machines:
        body += f"\nMachines (a run resumed on another machine is listed under each):\n\n{machines}"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    for folder in [out, Path(grid.records)] if grid.records else [out]:
        atomic_write_text(folder / f"{grid.name}.md", header + body)
        atomic_write_text(folder / f"{grid.name}.csv", buffer.getvalue())
    _bar_plot(grid, rows, out / f"{grid.name}.png")
    return out / f"{grid.name}.md"


def _bar_plot(grid: BenchGrid, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    names = [r["method"] for r in rows]
    ax.bar(
        names,
        [r["miou"] for r in rows],
        yerr=[r["miou_std"] for r in rows],
        capsize=4,
        color="#4C72B0",
    )
    base = next((r for r in rows if r["method"] == grid.baseline), None)
    if base is not None:
        ax.axhline(base["miou"], color="grey", linestyle="--", linewidth=1, label=grid.baseline)
        ax.legend(loc="lower right")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(grid.name)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
