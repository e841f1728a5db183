"""Run a bench grid on one GPU as concurrent processes, sized to a wall-time budget.

    python benchmarks/gpu_grid.py --grid benchmarks/grids/camvid-1_16-gpu.yaml --budget 540

`benchmarks/gpu_grid.sh` calls it on the GPU machine. Steps:

1. **Calibrate** (`--calibrate-iterations` steps): every (row, seed) that starts from
   ImageNet, all at once (the main phase's load), into a scratch folder. Each logs its
   s/iter while the others share the GPU and the CPU cores; a row's cost is the median
   over its seeds.
2. **Size.** The iterations N are the largest multiple of 10 that fit the time left with
   the slowest row, or a chain of a row and the rows that start from its checkpoint
   (offline self-training after its supervised teacher; their step is taken as twice the
   teacher's, since they cannot be calibrated before a teacher exists), times a safety
   factor, every step slowed by the load the uncalibrated rows add (`size_iterations`).
   N is written into a derived grid next to the runs (`train.iterations`, evaluations at
   every fifth), so the table records it.
3. **Run** every (row, seed) as `python -m semiseg bench DERIVED --methods M --seeds S`, a
   row that starts from another run's checkpoint as soon as that run has finished. A run
   still going at the deadline is stopped (it keeps its checkpoint; running the script
   again resumes it).
4. **Report**: `semiseg bench DERIVED --report` writes the table of the finished runs; with
   `--out`, the table is copied there, and every finished run's final.json, metrics.jsonl
   and config.yaml, the derived grid and every process's log go into one `runs.tar.gz`
   (the device tool brings back 8 files at most, none deeper than two folders), with
   `utilization.csv`: GPU and CPU load every 5 s of the whole call, to say which one bounds
   the step.

`--iterations N` skips the calibration. Nothing here names a method: rows and their
dependencies come from the grid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from semiseg.bench import load_grid, run_config, run_dir
from semiseg.config import save_config
from semiseg.metrics_log import read_metrics
from semiseg.run_folder import RunFolder

SAFETY = 0.75
SELF_TRAINING_COST = 2.0
"""A row that starts from another run's checkpoint: its step time over its teacher's."""


def dependencies(grid, method: str, seed: int) -> list[Path]:
    """Run folders of this grid whose checkpoint the run starts from."""
    init = run_config(grid, method, seed).model.init_from
    paths = [init] if isinstance(init, str) else list(init or [])
    folders = [run_dir(grid, m, s) for m in grid.methods for s in grid.seeds]
    return [f for f in folders for p in paths if Path(p).is_relative_to(f)]


def _command(grid_path: Path, method: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "semiseg", "bench", str(grid_path), "--methods", method,
            "--seeds", str(seed), "--no-progress"]  # fmt: skip


def _environment() -> dict[str, str]:
    # One CPU thread per process: the processes share the cores, and loader workers are
    # separate processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def calibrate(
    grid, runs: list[tuple[str, int]], iterations: int, scratch: Path
) -> dict[str, float]:
    """Each row's s/iter with all `runs` (row, seed) going at once: the median over its
    seeds of their logged windows after the first (which holds the start-up). Prints each
    row's s/iter and the share of it spent waiting for the data loaders."""
    shutil.rmtree(scratch, ignore_errors=True)
    procs = {}
    for method, seed in runs:
        name = f"{method}-seed{seed}"
        cfg = run_config(grid, method, seed)
        cfg.train.iterations = iterations
        cfg.train.epochs = None
        cfg.train.eval_every = 10 * iterations
        cfg.train.log_every = max(1, iterations // 4)
        cfg.output_dir = str(scratch / name)
        path = scratch / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
        log = (scratch / f"{name}.log").open("w")
        procs[method, seed] = subprocess.Popen(
            [sys.executable, "-m", "semiseg", "train", str(path), "--no-progress"],
            stdout=log, stderr=subprocess.STDOUT, env=_environment(),
        )  # fmt: skip
    times: dict[str, list[float]] = {}
    waits: dict[str, list[float]] = {}
    for (method, seed), proc in procs.items():
        name = f"{method}-seed{seed}"
        if proc.wait() != 0:
            # The device machine's files are gone after the call: the error must be printed.
            tail = (scratch / f"{name}.log").read_text().splitlines()[-30:]
            raise SystemExit("\n".join([f"calibration of {name} failed; its log ends:", *tail]))
        records = read_metrics(RunFolder(scratch / name).metrics)
        windows = [r for r in records if r["split"] == "train"][1:]
        times.setdefault(method, []).extend(r["sec_per_iter"] for r in windows)
        waits.setdefault(method, []).extend(r["data_wait_share"] for r in windows)
    costs = {method: statistics.median(t) for method, t in times.items()}
    for method, cost in costs.items():
        print(
            f"calibration: {method} {cost:.3f} s/iter, data wait share "
            f"{statistics.median(waits[method]):.2f}, with {len(runs)} processes at once"
        )
    return costs


@contextlib.contextmanager
def mps_daemon(folder: Path) -> Iterator[None]:
    """NVIDIA's Multi-Process Service for the duration: the processes' kernels then share
    the GPU at once instead of taking turns (each run's small kernels fill a fraction of an
    H200). Changes no setting of the device; the daemon quits on exit."""
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": str(folder / "mps-pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(folder / "mps-log"),
    }
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    control = ["nvidia-cuda-mps-control"]
    try:
        subprocess.run([*control, "-d"], env={**os.environ, **env}, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise SystemExit(f"--mps: the MPS control daemon did not start: {err}") from None
    os.environ.update(env)
    try:
        yield
    finally:
        subprocess.run(control, input="quit\n", text=True, timeout=30, check=False)
        for key in env:
            os.environ.pop(key)


def size_iterations(grid, costs: dict[str, float], seconds: float) -> tuple[int, str]:
    """N and the row (or chain) that bounds it.

    A row that starts from another run's checkpoint costs SELF_TRAINING_COST times its
    teacher per step and runs after it (a chain). The calibration ran the rows that start
    from ImageNet; the main phase adds the dependent rows, so every step is taken as slower
    by the load they add: (sum of every run's step cost) / (sum of the calibrated runs').
    N is a multiple of 10 (at least 100)."""
    chains, step = {}, {}
    for method in grid.methods:
        teachers = {d.parent.name for d in dependencies(grid, method, grid.seeds[0])}
        if teachers:
            teacher = max(costs[t] for t in teachers)
            step[method] = teacher * SELF_TRAINING_COST
            chains[f"{'+'.join(sorted(teachers))} then {method}"] = teacher + step[method]
        else:
            step[method] = chains[method] = costs[method]
    calibrated = sum(costs[m] for m in grid.methods if m in costs)
    load = sum(step.values()) / calibrated
    bound = max(chains, key=chains.get)
    iterations = int(SAFETY * seconds / (chains[bound] * load)) // 10 * 10
    return max(100, iterations), bound


def derived_grid(grid_path: Path, grid, iterations: int, folder: Path) -> Path:
    data = yaml.safe_load(grid_path.read_text())
    data.pop("rows_from", None)
    data.update(
        methods=grid.methods,
        seeds=grid.seeds,
        baseline=grid.baseline,
        compare=grid.compare,
        overrides=[
            *grid.overrides,
            f"train.iterations={iterations}",
            f"train.eval_every={max(1, iterations // 5)}",
        ],
    )
    path = folder / f"{grid.name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _out_of_memory(log: Path) -> bool:
    """Whether the run logging to `log` died of CUDA running out of memory."""
    return "OutOfMemoryError" in log.read_text(errors="replace")[-20000:]


def run_all(
    path: Path, deadline: float, logs: Path, methods: list[str] | None = None, retries: int = 2
) -> None:
    """Every (row, seed) of `methods` (all rows if None), each once its teachers have
    finished. A run that dies of CUDA memory (the rows that start from a teacher's checkpoint
    join the processes already there) starts again, from its last checkpoint, once another
    run has finished and freed its memory: at most `retries` times."""
    grid = load_grid(path)
    waiting = [(m, s) for m in methods or grid.methods for s in grid.seeds]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    retried: dict[tuple[str, int], int] = {}
    # A retried run waits until more runs have finished than had when it failed (or until
    # nothing else runs).
    not_before: dict[tuple[str, int], int] = {}
    finished = 0
    logs.mkdir(parents=True, exist_ok=True)
    while waiting or running:
        for key in list(waiting):
            teachers = all(RunFolder(d).read_final() for d in dependencies(grid, *key))
            if teachers and (finished >= not_before.get(key, 0) or not running):
                log = (logs / f"{key[0]}-seed{key[1]}.log").open("a")
                running[key] = subprocess.Popen(
                    _command(path, *key), stdout=log, stderr=subprocess.STDOUT,
                    env=_environment(),
                )  # fmt: skip
                waiting.remove(key)
        for key, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            status = "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"
            log = logs / f"{key[0]}-seed{key[1]}.log"
            if proc.returncode == 0:
                finished += 1
            elif retried.get(key, 0) < retries and _out_of_memory(log):
                retried[key] = retried.get(key, 0) + 1
                not_before[key] = finished + 1
                waiting.append(key)
                status += ": out of GPU memory, retried after the next run finishes"
            print(f"{time.strftime('%H:%M:%S')} {key[0]} seed {key[1]}: {status}")
        if time.monotonic() > deadline:
            for key, proc in running.items():
                proc.terminate()
                print(f"deadline: stopped {key[0]} seed {key[1]} (resumable)")
            for proc in running.values():
                proc.wait()
            for key in waiting:
                print(f"deadline: {key[0]} seed {key[1]} never started (or restarted)")
            return
        time.sleep(2)


def copy_results(grid, grid_path: Path, out: Path) -> None:
    """The table, CSV and plot into `out`; every finished run's records, the derived grid
    and the logs (of the runs and of the calibration) into `out/runs.tar.gz`, as
    runs/ROW/seedS/{final.json,metrics.jsonl,config.yaml}, grid.yaml, logs/, calibration/."""
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(grid.output_dir)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for method in grid.methods:
            for seed in grid.seeds:
                run = RunFolder(run_dir(grid, method, seed))
                if not run.read_final():
                    continue
                target = f"runs/{method}/seed{seed}"
                tar.add(run.metrics_folder().metrics, f"{target}/metrics.jsonl")
                for name in ("final.json", "config.yaml"):
                    tar.add(run.path / name, f"{target}/{name}")
        tar.add(grid_path, "grid.yaml")
        for logs in ("logs", "calibration"):
            for log in sorted((folder / logs).glob("*.log")):
                tar.add(log, f"{logs}/{log.name}")
    for suffix in (".md", ".csv", ".png"):
        table = folder / f"{grid.name}{suffix}"
        if table.is_file():
            shutil.copyfile(table, out / table.name)


def _cpu_busy(previous: list[int]) -> tuple[float, list[int]]:
    """Share of all cores busy since `previous` (the /proc/stat counters), and the counters."""
    with open("/proc/stat") as stat:
        counters = [int(x) for x in stat.readline().split()[1:]]
    idle = counters[3] + counters[4]  # idle and iowait
    if not previous:
        return float("nan"), counters
    total = sum(counters) - sum(previous)
    return 1 - (idle - previous[3] - previous[4]) / max(total, 1), counters


def sample_utilization(path: Path, stop: threading.Event, every: float = 5.0) -> None:
    """Every `every` s until `stop`: seconds since start, GPU utilisation and memory (from
    nvidia-smi, empty without one) and the share of CPU time busy, as CSV lines in `path`."""
    start = time.monotonic()
    _, counters = _cpu_busy([])
    query = [
        "nvidia-smi",
        "--query-gpu=utilization.gpu,memory.used",
        "--format=csv,noheader,nounits",
    ]
    with path.open("w") as csv:
        csv.write("seconds,gpu_util_percent,gpu_memory_mib,cpu_busy\n")
        while not stop.wait(every):
            try:
                gpu = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                gpu = ",".join(x.strip() for x in gpu.strip().splitlines()[0].split(","))
            except (OSError, subprocess.SubprocessError, IndexError):
                gpu = ","
            busy, counters = _cpu_busy(counters)
            csv.write(f"{time.monotonic() - start:.0f},{gpu},{busy:.3f}\n")
            csv.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=Path("benchmarks/grids/camvid-1_16-gpu.yaml"))
    parser.add_argument("--budget", type=float, default=540.0, help="wall seconds in all")
    parser.add_argument("--calibrate-iterations", type=int, default=24)
    parser.add_argument("--iterations", type=int, help="skip the calibration")
    parser.add_argument("--max-iterations", type=int, default=20000)
    parser.add_argument("--out", type=Path, help="copy the table and run records here")
    parser.add_argument(
        "--mps", choices=("auto", "on", "off"), default="auto",
        help="run under NVIDIA MPS; auto: when CUDA and nvidia-cuda-mps-control are there "
        "(on one H200 it halved the slowest row's step with 27 runs at once)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate-only", nargs="*", metavar="ROW",
        help="only calibrate (these rows; all that start from ImageNet if none) and stop",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate-seeds", nargs="+", type=int, help="with --calibrate-only: these seeds"
    )
    parser.add_argument(
        "--methods", nargs="+", metavar="ROW",
        help="run only these rows (with --iterations; list a row's teacher rows too)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="an override for every run, after the grid's own (e.g. data.augment_on=loader)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.methods and not args.iterations:
        parser.error("--methods needs --iterations: the calibration sizes the whole grid")
    mps = args.mps == "on" or (
        args.mps == "auto"
        and shutil.which("nvidia-cuda-mps-control") is not None
        and torch.cuda.is_available()
    )
    print(f"MPS: {'on' if mps else 'off'}")
    with mps_daemon(Path("/tmp/semiseg-mps")) if mps else contextlib.nullcontext():
        run_grid(args)


def run_grid(args: argparse.Namespace) -> None:
    start = time.monotonic()
    grid = load_grid(args.grid)
    grid.overrides = [*grid.overrides, *args.set]
    folder = Path(grid.output_dir)
    unknown = sorted(set(args.methods or []) - set(grid.methods))
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} not in {args.grid}")
    processes = len(args.methods or grid.methods) * len(grid.seeds)
    stop = threading.Event()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        sampler = threading.Thread(
            target=sample_utilization, args=(args.out / "utilization.csv", stop), daemon=True
        )
        sampler.start()
    if args.iterations:
        iterations, bound = args.iterations, "given"
    else:
        runs = [(m, s) for m in grid.methods for s in grid.seeds if not dependencies(grid, m, s)]
        if args.calibrate_only:
            runs = [(m, s) for m, s in runs if m in args.calibrate_only]
        if args.calibrate_only is not None and args.calibrate_seeds:
            runs = [(m, s) for m, s in runs if s in args.calibrate_seeds]
        costs = calibrate(grid, runs, args.calibrate_iterations, folder / "calibration")
        if args.calibrate_only is not None:
            stop.set()
            return
        left = args.budget - (time.monotonic() - start)
        iterations, bound = size_iterations(grid, costs, left)
        iterations = min(iterations, args.max_iterations)
    print(f"{processes} runs of {iterations} iterations (bounded by {bound})")
    path = derived_grid(args.grid, grid, iterations, folder)
    # The report and the copies need a few seconds after the last run stops.
    run_all(path, start + args.budget - 20, folder / "logs", args.methods)
    subprocess.run([sys.executable, "-m", "semiseg", "bench", str(path), "--report"], check=False)
    stop.set()
    if args.out:
        copy_results(load_grid(path), path, args.out)
        print(f"results in {args.out}")


if __name__ == "__main__":
    main()
