"""benchmarks/gpu_grid.py: dependencies between rows, sizing from a calibration, and one
tiny grid run end to end (calibration, concurrent runs, a row after its teacher, report)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import load_benchmark, tiny_config, write_grid

from semiseg.bench import load_grid, run_dir

gpu_grid = load_benchmark("gpu_grid")


@pytest.fixture
def grid_path(synthetic_root, tmp_path) -> Path:
    base_cfg = tiny_config(
        synthetic_root, tmp_path / "unused", train={"iterations": 4, "eval_every": 4}
    )
    methods = {
        "supervised": [],
        "fixmatch": ["scheme.name=fixmatch", "policy.name=threshold"],
        "st": [
            "scheme.name=self_training",
            "scheme.method=st",
            "scheme.alpha=[0.3]",
            "model.init_from={output_dir}/supervised/seed{seed}/latest.pt",
        ],
    }
    return write_grid(
        tmp_path, base_cfg, methods, name="tiny-gpu", seeds=[0], compare={"st": "supervised"}
    )


def test_dependencies_and_sizing(grid_path):
    grid = load_grid(grid_path)
    assert gpu_grid.dependencies(grid, "st", 0) == [run_dir(grid, "supervised", 0)]
    assert gpu_grid.dependencies(grid, "fixmatch", 0) == []
    # The chain supervised -> st costs 0.2 + 0.2 * 2 = 0.6 s per iteration, more than
    # fixmatch's 0.3; st adds 0.4 s of steps to the calibrated 0.2 + 0.3, a load of 1.8:
    # N = 0.75 * 1000 / (0.6 * 1.8) = 694 -> 690.
    iterations, bound = gpu_grid.size_iterations(
        grid, {"supervised": 0.2, "fixmatch": 0.3}, seconds=1000
    )
    assert (iterations, bound) == (690, "supervised then st")
    assert gpu_grid.size_iterations(grid, {"supervised": 9, "fixmatch": 9}, 10)[0] == 100


def test_tiny_grid_end_to_end(grid_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(
        "sys.argv",
        ["gpu_grid.py", "--grid", str(grid_path), "--budget", "600", "--calibrate-iterations", "4",
         "--max-iterations", "10", "--out", str(out)],
    )  # fmt: skip
    gpu_grid.main()
    printed = capsys.readouterr().out
    assert "calibration: supervised" in printed and "calibration: fixmatch" in printed
    assert "calibration: st" not in printed
    derived = load_grid(tmp_path / "bench" / "tiny-gpu.yaml")
    iterations = int(derived.overrides[-2].split("=")[1])
    assert iterations == 10  # the calibration allows more; --max-iterations caps it
    # Everything but the table comes back in one archive (the device tool returns 8 files).
    with tarfile.open(out / "runs.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = tmp_path / "back"
    for method in ("supervised", "fixmatch", "st"):
        final = json.loads((back / "runs" / method / "seed0" / "final.json").read_text())
        assert final["iteration"] == iterations
        assert (back / "runs" / method / "seed0" / "metrics.jsonl").is_file()
    assert load_grid(back / "grid.yaml").overrides == derived.overrides
    assert {p.name for p in (back / "logs").iterdir()} == {
        "supervised-seed0.log", "fixmatch-seed0.log", "st-seed0.log"
    }  # fmt: skip
    assert (back / "calibration" / "fixmatch-seed0.log").is_file()
    lines = (out / "utilization.csv").read_text().splitlines()
    assert lines[0] == "seconds,gpu_util_percent,gpu_memory_mib,cpu_busy"
    # One sample every 5 s; the CPU share is a fraction (no GPU here: its fields are empty).
    assert all(0 <= float(line.split(",")[-1]) <= 1 for line in lines[1:])
    assert sorted(p.name for p in out.iterdir()) == [
        "runs.tar.gz", "tiny-gpu.csv", "tiny-gpu.md", "tiny-gpu.png", "utilization.csv"
    ]  # fmt: skip
    table = (out / "tiny-gpu.md").read_text()
    # The first table's row (last evaluation); the last-fifth table below it has one too.
    st_row, _ = [line for line in table.splitlines() if line.startswith("| st | 1 |")]
    assert "| supervised: " in st_row


def test_calibrate_only_measures_the_named_rows_and_runs_nothing(grid_path, tmp_path, capsys):
    import sys

    argv = ["gpu_grid.py", "--grid", str(grid_path), "--calibrate-iterations", "4",
            "--calibrate-only", "fixmatch", "--set", "train.cuda_sync=block",
            "--set", "data.augment_on=device"]  # fmt: skip
    sys.argv, saved = argv, sys.argv
    try:
        gpu_grid.main()
    finally:
        sys.argv = saved
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("calibration:")]
    assert line.startswith("calibration: fixmatch ") and "data wait share" in line
    assert "with 1 processes at once" in line
    # No main phase: no derived grid, no runs. The calibration config asked for blocking
    # waits, a no-op on the CPU.
    assert not (tmp_path / "bench" / "tiny-gpu.yaml").exists()
    calibrated = yaml.safe_load(
        (tmp_path / "bench" / "calibration" / "fixmatch-seed0.yaml").read_text()
    )
    assert calibrated["train"]["cuda_sync"] == "block"
    assert calibrated["data"]["augment_on"] == "device"


def test_a_failed_calibration_prints_the_end_of_its_log(grid_path, monkeypatch):
    monkeypatch.setattr(
        "sys.argv",
        ["gpu_grid.py", "--grid", str(grid_path), "--calibrate-only", "fixmatch",
         "--set", "data.labeled=missing/labeled.txt"],
    )  # fmt: skip
    with pytest.raises(SystemExit) as failed:
        gpu_grid.main()
    message = str(failed.value)
    assert message.startswith("calibration of fixmatch-seed0 failed; its log ends:")
    assert "missing/labeled.txt" in message


def test_selected_rows_run_and_a_run_out_of_gpu_memory_is_retried(
    grid_path, tmp_path, monkeypatch, capsys
):
    import sys

    real = gpu_grid._command
    attempts = []

    def command(path, method, seed):
        attempts.append(method)
        if method == "fixmatch" and attempts.count("fixmatch") == 1:
            crash = "print('torch.OutOfMemoryError: CUDA out of memory.'); raise SystemExit(1)"
            return [sys.executable, "-c", crash]
        return real(path, method, seed)

    monkeypatch.setattr(gpu_grid, "_command", command)
    monkeypatch.setattr(
        "sys.argv",
        ["gpu_grid.py", "--grid", str(grid_path), "--iterations", "4",
         "--methods", "supervised", "fixmatch"],
    )  # fmt: skip
    gpu_grid.main()
    printed = capsys.readouterr().out
    assert "fixmatch seed 0: failed (1): out of GPU memory, retried" in printed
    assert sorted(attempts) == ["fixmatch", "fixmatch", "supervised"]
    grid = load_grid(grid_path)
    for method in ("supervised", "fixmatch"):
        final = json.loads((run_dir(grid, method, 0) / "final.json").read_text())
        assert final["iteration"] == 4
    assert not run_dir(grid, "st", 0).exists()  # not selected


def test_unknown_rows_and_rows_without_iterations_are_refused(grid_path, monkeypatch):
    monkeypatch.setattr(
        "sys.argv", ["gpu_grid.py", "--grid", str(grid_path), "--iterations", "4",
                     "--methods", "supervised", "nope"],
    )  # fmt: skip
    with pytest.raises(SystemExit, match="nope not in"):
        gpu_grid.main()
    monkeypatch.setattr(
        "sys.argv", ["gpu_grid.py", "--grid", str(grid_path), "--methods", "supervised"]
    )
    with pytest.raises(SystemExit):
        gpu_grid.main()
