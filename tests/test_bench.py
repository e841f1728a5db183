"""`semiseg bench`: grid loading, skip/resume of runs, the summary table, and `semiseg plot`."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import tiny_config, write_grid

from semiseg.bench import (
    BenchGrid,
    RunResult,
    keep_record,
    last_fifth_table,
    load_grid,
    log_dir,
    markdown_table,
    paired_gain,
    read_result,
    run_config,
    summarize,
)
from semiseg.bench_status import grid_status
from semiseg.cli import main
from semiseg.config import ConfigError
from semiseg.curves import mean_over_tail, pair_summary, paired_curve, rise_over_tail, val_curve
from semiseg.run_folder import RunFolder


def test_summary_means_spread_and_gain():
    grid = BenchGrid(
        name="g", base="b.yaml", output_dir="o", methods={"supervised": [], "x": []}, seeds=[0, 1]
    )
    results = [
        RunResult("supervised", 0, 0.40, 0.10, 1.0, 5),
        RunResult("supervised", 1, 0.42, 0.12, 1.2, 5),
        RunResult("x", 0, 0.45, 0.20, 2.0, 5),
        RunResult("x", 1, 0.47, 0.22, 2.2, 5),
    ]
    rows = {r["method"]: r for r in summarize(grid, results)}
    assert rows["supervised"]["miou"] == pytest.approx(41.0)
    assert rows["supervised"]["miou_std"] == pytest.approx(1.41421, rel=1e-4)
    assert rows["x"]["gain"] == pytest.approx(5.0)
    assert rows["x"]["tail_gain"] == pytest.approx(10.0)
    assert rows["x"]["sec_per_iter"] == pytest.approx(2.1)


def test_paired_gain_and_own_baseline():
    # Seed 2 of x is missing: the pairs are seeds 0 and 1 only. Per-seed gains over
    # supervised are 3 and 5 points: mean 4, sample std sqrt(2), SE sqrt(2)/sqrt(2) = 1.
    grid = BenchGrid(
        name="g",
        base="b.yaml",
        output_dir="o",
        methods={"supervised": [], "y": [], "x": []},
        seeds=[0, 1, 2],
        compare={"x": "y"},
    )
    results = [
        RunResult("supervised", 0, 0.40, None, 1.0, 5),
        RunResult("supervised", 1, 0.50, None, 1.0, 5),
        RunResult("supervised", 2, 0.45, None, 1.0, 5),
        RunResult("y", 0, 0.42, None, 1.0, 5),
        RunResult("y", 1, 0.52, None, 1.0, 5),
        RunResult("x", 0, 0.43, None, 1.0, 5),
        RunResult("x", 1, 0.55, None, 1.0, 5),
    ]
    gain, se, n = paired_gain(results, "x", "supervised")
    assert (gain, se, n) == (pytest.approx(4.0), pytest.approx(1.0), 2)
    rows = {r["method"]: r for r in summarize(grid, results)}
    assert rows["x"]["paired_gain"] == pytest.approx(4.0)
    assert rows["x"]["paired_se"] == pytest.approx(1.0)
    # x over its own baseline y: 1 and 3 points, mean 2, SE 1.
    assert rows["x"]["own_baseline"] == "y"
    assert rows["x"]["own_gain"] == pytest.approx(2.0)
    assert rows["x"]["own_se"] == pytest.approx(1.0)
    assert rows["supervised"]["paired_gain"] is None
    table = markdown_table(grid, list(rows.values()))
    # 4 > 2 x 1: beyond two standard errors; y gains 2 and 2 points, SE 0.
    assert "| +4.00 ± 1.00 (2) | yes |" in table
    assert "y: +2.00 ± 1.00 (2)" in table
    assert paired_gain(results, "x", "nobody") == (None, None, 0)
    assert paired_gain(results[:4], "y", "supervised") == (pytest.approx(2.0), None, 1)


def test_bad_grids_are_refused(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "g", "base": "b", "output_dir": "o", "methods": {"a": []}, "baseline": "zzz"}
        )
    )
    with pytest.raises(ConfigError, match="baseline 'zzz'"):
        load_grid(path)
    path.write_text(
        yaml.safe_dump(
            {"name": "g", "base": "b", "output_dir": "o", "methods": {"a": []}, "sedes": [0]}
        )
    )
    with pytest.raises(ConfigError, match="unknown key 'sedes'"):
        load_grid(path)
    path.write_text(
        yaml.safe_dump(
            {
                "name": "g",
                "base": "b",
                "output_dir": "o",
                "methods": {"a": []},
                "baseline": "a",
                "compare": {"a": "b"},
            }
        )
    )
    with pytest.raises(ConfigError, match="compare.a: 'b' is not one of the methods"):
        load_grid(path)


def test_bench_runs_the_grid_then_reuses_finished_runs(synthetic_root, tmp_path, capsys):
    base_cfg = tiny_config(
        synthetic_root,
        tmp_path / "unused",
        train={"iterations": 2, "eval_every": 2, "log_every": 1},
    )
    fixmatch = [
        "scheme.name=fixmatch",
        "policy.name=threshold",
        "policy.threshold=0.0",
        "scheme.oracle_eval=true",
    ]
    grid = write_grid(tmp_path, base_cfg, {"supervised": [], "fixmatch": fixmatch})
    out = tmp_path / "bench"
    assert main(["bench", str(grid), "--no-progress"]) == 0
    assert (out / "tiny.md").is_file() and (out / "tiny.png").is_file()
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [r["method"] for r in rows] == ["supervised", "fixmatch"]
    assert all(r["seeds"] == "2" for r in rows)
    # Every run recorded where it trained, and the report says so.
    assert "| runs (method seed) |" in (out / "tiny.md").read_text()
    assert "supervised 0, supervised 1, fixmatch 0, fixmatch 1" in (out / "tiny.md").read_text()
    assert "| mIoU, last fifth (%) |" in (out / "tiny.md").read_text()
    finished = (out / "fixmatch" / "seed1" / "final.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["bench", str(grid), "--no-progress"]) == 0
    assert "finished, read from" in capsys.readouterr().out
    assert (out / "fixmatch" / "seed1" / "final.json").stat().st_mtime_ns == finished

    assert main(["plot", str(out / "fixmatch" / "seed0")]) == 0
    assert (out / "fixmatch" / "seed0" / "plots" / "pseudo_labels.png").is_file()
    assert (
        main(
            ["plot", str(out / "fixmatch" / "seed0"), "--compare", str(out / "fixmatch" / "seed1")]
        )
        == 0
    )
    assert (out / "fixmatch" / "seed0" / "plots" / "pseudo_label_accuracy.png").is_file()
    # A supervised run has no pseudo labels: the comparison draws val mIoU only.
    (out / "fixmatch" / "seed0" / "plots" / "pseudo_label_accuracy.png").unlink()
    assert (
        main(
            [
                "plot",
                str(out / "fixmatch" / "seed0"),
                "--compare",
                str(out / "supervised" / "seed0"),
            ]
        )
        == 0
    )
    assert (out / "fixmatch" / "seed0" / "plots" / "val_miou_comparison.png").is_file()
    assert not (out / "fixmatch" / "seed0" / "plots" / "pseudo_label_accuracy.png").exists()


def test_seed_placeholder_and_run_selection(synthetic_root, tmp_path, capsys):
    base_cfg = tiny_config(
        synthetic_root, tmp_path / "unused", train={"iterations": 2, "eval_every": 2}
    )
    grid = write_grid(tmp_path, base_cfg, {"supervised": [], "other": ["optim.lr=0.02"]})
    base = tmp_path / "base.yaml"
    warm = BenchGrid(
        name="w",
        base=str(base),
        output_dir="o",
        methods={"m": []},
        seeds=[3],
        overrides=["model.init_from=x/seed{seed}.pt"],
    )
    assert run_config(warm, "m", 3).model.init_from == "x/seed3.pt"
    pair = BenchGrid(
        name="p",
        base=str(base),
        output_dir="o",
        methods={"m": ["model.init_from=[x/s{seed}.pt,x/s{next_seed}.pt]"]},
        seeds=[0, 1, 2],
    )
    assert run_config(pair, "m", 1).model.init_from == ["x/s1.pt", "x/s2.pt"]
    assert run_config(pair, "m", 2).model.init_from == ["x/s2.pt", "x/s0.pt"]

    out = tmp_path / "bench"
    assert main(["bench", str(grid), "--methods", "nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["bench", str(grid), "--methods", "othr"]) == 2
    assert "the grid has ['supervised', 'other']; did you mean 'other'?" in capsys.readouterr().err
    assert main(["bench", str(grid), "--seeds", "7"]) == 2
    assert "seed(s) [7] are not in the grid's seeds [0, 1]" in capsys.readouterr().err

    assert main(["bench", str(grid), "--no-progress", "--methods", "other", "--seeds", "1"]) == 0
    assert (out / "other" / "seed1" / "final.json").is_file()
    assert not (out / "supervised").exists() and not (out / "other" / "seed0").exists()
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [(r["method"], r["seeds"]) for r in rows] == [("other", "1")]
    # --report tabulates the finished run and trains nothing.
    capsys.readouterr()
    assert main(["bench", str(grid), "--report"]) == 0
    assert "| other | 1 |" in capsys.readouterr().out
    assert not (out / "supervised").exists()


def test_records_outlive_the_run_folders(synthetic_root, tmp_path, capsys):
    # A new machine (or a clone) has the committed records but not the run folders: the table
    # and the curves come from the records, a finished run is not trained again, and a row
    # that needs a recorded run's weights says how to rebuild them before training anything.
    base_cfg = tiny_config(
        synthetic_root, tmp_path / "unused", train={"iterations": 2, "eval_every": 2}
    )
    warm = ["model.init_from={output_dir}/supervised/seed{seed}/latest.pt"]
    grid_path = write_grid(
        tmp_path,
        base_cfg,
        {"supervised": [], "continued": warm},
        seeds=(0,),
        records=str(tmp_path / "results"),
    )
    out, records = tmp_path / "bench", tmp_path / "results"
    assert main(["bench", str(grid_path), "--no-progress", "--methods", "supervised"]) == 0
    kept = sorted(p.name for p in (records / "supervised" / "seed0").iterdir())
    assert kept == ["config.yaml", "environment.jsonl", "final.json", "metrics.jsonl"]
    assert (records / "tiny.md").read_text() == (out / "tiny.md").read_text()
    assert (records / "tiny.csv").is_file() and not (records / "tiny.png").exists()
    grid = load_grid(grid_path)
    assert keep_record(grid, "supervised", 0) == 0  # unchanged files are not rewritten
    # --report keeps the records of the finished runs it finds (a run trained by a bench
    # process started before the grid named its records folder).
    (records / "supervised" / "seed0" / "metrics.jsonl").unlink()
    assert main(["bench", str(grid_path), "--report"]) == 0
    assert (records / "supervised" / "seed0" / "metrics.jsonl").is_file()
    assert log_dir(grid, "supervised", 0) == out / "supervised" / "seed0"

    table = (out / "tiny.md").read_text()
    for path in out.rglob("*"):
        if path.is_file():
            path.unlink()
    capsys.readouterr()
    assert main(["bench", str(grid_path), "--report"]) == 0
    assert "| supervised | 1 |" in capsys.readouterr().out
    assert (out / "tiny.md").read_text() == table
    assert log_dir(grid, "supervised", 0) == records / "supervised" / "seed0"
    assert val_curve(log_dir(grid, "supervised", 0))

    assert main(["bench", str(grid_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "supervised seed 0: finished, read from its record" in captured.out
    assert (
        "continued seed 0: model.init_from needs the weights of supervised seed 0" in captured.err
    )
    assert "only its record" in captured.err
    rebuild = (
        f"semiseg train {records / 'supervised' / 'seed0' / 'config.yaml'} "
        f"output_dir={out / 'supervised' / 'seed0'}"
    )
    assert rebuild in captured.err
    assert not (out / "continued" / "seed0" / "metrics.jsonl").exists()
    states = {(r.method, r.state) for r in grid_status(grid)}
    assert states == {
        ("supervised", "finished (record)"),
        ("continued", "needs weights of supervised seed 0"),
    }
    # The command the error names rebuilds the weights where the row looks for them.
    cmd = rebuild.split()[2:]
    assert main(["train", *cmd, "--no-progress"]) == 0
    assert (out / "supervised" / "seed0" / "latest.pt").is_file()
    assert main(["bench", str(grid_path), "--no-progress"]) == 0
    assert (out / "continued" / "seed0" / "final.json").is_file()


def test_record_files_of_a_self_training_run(tmp_path):
    run = tmp_path / "run"
    for name in ["config.yaml", "final.json", "latest.pt", "round1/metrics.jsonl"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "round1" / "pseudo" / "labels").mkdir(parents=True)
    (run / "round1" / "pseudo" / "stats.json").write_text("{}")
    (run / "round1" / "pseudo" / "labels" / "0.png").write_text("x")
    (run / "tensorboard").mkdir()
    files = [str(p.relative_to(run)) for p in RunFolder(run).record_files()]
    assert files == [
        "config.yaml",
        "final.json",
        "round1/metrics.jsonl",
        "round1/pseudo/stats.json",
    ]


def _write_val_log(folder, points):
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"iteration": i, "split": "train", "loss": 1.0, "sec_per_iter": 0.1})
        for i, _ in points
    ] + [json.dumps({"iteration": i, "split": "val", "miou": m}) for i, m in points]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_val_curves_paired_gain_and_rise(tmp_path):
    _write_val_log(tmp_path / "b0", [(50, 0.30), (100, 0.40)])
    _write_val_log(tmp_path / "b1", [(50, 0.32), (100, 0.44)])
    _write_val_log(tmp_path / "m0", [(50, 0.31), (100, 0.43)])
    _write_val_log(tmp_path / "m1", [(50, 0.35), (100, 0.49)])
    base = {0: val_curve(tmp_path / "b0"), 1: val_curve(tmp_path / "b1")}
    runs = {0: val_curve(tmp_path / "m0"), 1: val_curve(tmp_path / "m1")}
    assert base[0] == {50: pytest.approx(30.0), 100: pytest.approx(40.0)}
    assert val_curve(tmp_path / "missing") == {}
    first, last = paired_curve(runs, base)
    # Gains at 50: 1 and 3 (mean 2, SE 1); at 100: 3 and 5 (mean 4, SE 1).
    assert (first.iteration, first.gain, first.se, first.pairs) == (
        50,
        pytest.approx(2.0),
        pytest.approx(1.0),
        2,
    )
    assert last.gain == pytest.approx(4.0) and last.mean == pytest.approx(46.0)
    assert paired_curve(runs, None)[0].gain is None
    # The last fifth of a 100-iteration schedule starts at 80: the eval at 50 is its start.
    assert rise_over_tail(base[1], 100) == pytest.approx(12.0)
    assert rise_over_tail(base[1], 200) is None
    assert rise_over_tail({100: 40.0}, 100) is None


def test_a_run_against_its_pair_over_the_shared_evaluations():
    # Gains at 20/40/60/80/100: -2, +1, -1, -3, +1 (the eval at 10 is the run's alone).
    run = {10: 5.0, 20: 30.0, 40: 41.0, 60: 44.0, 80: 45.0, 100: 50.0}
    pair = {20: 32.0, 40: 40.0, 60: 45.0, 80: 48.0, 100: 49.0}
    summary = pair_summary(run, pair, 100)
    assert (summary.evaluations, summary.below) == (5, 3)
    assert summary.mean_gain == pytest.approx(-0.8)
    # From the midpoint (50) on: -1, -3, +1.
    assert summary.late_gain == pytest.approx(-1.0)
    # Last fifth (80..100): run 47.5, pair 48.5.
    assert summary.tail_gain == pytest.approx(-1.0)
    unfinished = pair_summary({20: 30.0}, pair, 100)
    assert (unfinished.late_gain, unfinished.tail_gain) == (None, None)
    assert pair_summary({10: 5.0}, pair, 100) is None


def test_mean_over_the_last_fifth(tmp_path):
    # 100 iterations: the last fifth is 80..100. The eval at 80 is logged twice (a resume),
    # the later one (0.58) wins; the mean is (58 + 62) / 2 = 60 points.
    _write_val_log(tmp_path / "run", [(20, 0.30), (60, 0.50), (80, 0.60), (80, 0.58), (100, 0.62)])
    (tmp_path / "run" / "final.json").write_text(json.dumps({"iteration": 100}))
    assert mean_over_tail(val_curve(tmp_path / "run"), 100) == pytest.approx(60.0)
    assert mean_over_tail({50: 40.0}, 100) is None
    result = read_result("x", 0, tmp_path / "run", 100)
    assert result.miou == pytest.approx(0.62)
    assert result.last_fifth_miou == pytest.approx(0.60)


def test_last_fifth_paired_gain_and_table():
    # Last-fifth means: supervised 40 / 50, x 43 / 55 (gains 3 and 5: mean 4, SE 1), y 42 / 52
    # (x over y: 1 and 3, mean 2, SE 1). The last evaluations differ, so the two tables do.
    grid = BenchGrid(
        name="g",
        base="b.yaml",
        output_dir="o",
        methods={"supervised": [], "y": [], "x": []},
        seeds=[0, 1],
        compare={"x": "y"},
    )
    results = [
        RunResult("supervised", 0, 0.41, None, 1.0, 5, last_fifth_miou=0.40),
        RunResult("supervised", 1, 0.50, None, 1.0, 5, last_fifth_miou=0.50),
        RunResult("y", 0, 0.40, None, 1.0, 5, last_fifth_miou=0.42),
        RunResult("y", 1, 0.52, None, 1.0, 5, last_fifth_miou=0.52),
        RunResult("x", 0, 0.42, None, 1.0, 5, last_fifth_miou=0.43),
        RunResult("x", 1, 0.50, None, 1.0, 5, last_fifth_miou=0.55),
    ]
    rows = {r["method"]: r for r in summarize(grid, results)}
    assert rows["x"]["last_fifth_miou"] == pytest.approx(49.0)
    assert rows["x"]["last_fifth_gain"] == pytest.approx(4.0)
    assert rows["x"]["last_fifth_se"] == pytest.approx(1.0)
    assert rows["x"]["own_last_fifth_gain"] == pytest.approx(2.0)
    assert rows["x"]["paired_gain"] == pytest.approx(0.5)
    table = last_fifth_table(grid, list(rows.values()))
    assert "| x | 2 | 49.00 ± 8.49 | +4.00 ± 1.00 (2) | yes | y: +2.00 ± 1.00 (2) |" in table
    assert "| supervised | 2 | 45.00 ± 7.07 | - | - | - |" in table
    # Runs logged without an evaluation at their end have no last-fifth mean: no table.
    bare = [RunResult("supervised", 0, 0.41, None, 1.0, 5)]
    assert last_fifth_table(grid, summarize(grid, bare)) == ""
    assert paired_gain(bare + results[2:3], "y", "supervised", "last_fifth_miou") == (None, None, 0)
