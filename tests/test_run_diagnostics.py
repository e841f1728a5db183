"""benchmarks/run_diagnostics.py: logged means of self-training rows (their log is in the
last round's folder) and the per-class pseudo-label counts of a round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

run_diagnostics = load_benchmark("run_diagnostics")


def _self_training_run(root: Path, method: str, seed: int, thresholded, final, kl) -> None:
    run = root / method / f"seed{seed}"
    (run / "round1" / "pseudo").mkdir(parents=True)
    record = {
        "final": {"miou": 0.5, "iou/Road": 0.9, "iou/Car": 0.4, "iou/Pole": 0.1},
        "metrics_dir": "round1",
        "rounds": [
            {"round": 0, "checkpoint": "teacher.pt"},
            {
                "round": 1,
                "thresholded": thresholded,
                "final": final,
                "kl_thresholded": kl[0],
                "kl_final": kl[1],
            },
        ],
    }
    (run / "final.json").write_text(json.dumps(record))
    stats = {"labeled_ratio": [0.5, 0.3, 0.2]}
    (run / "round1" / "pseudo" / "stats.json").write_text(json.dumps(stats))
    (run / "config.yaml").write_text("{}\n")
    logs = [{"split": "train", "iteration": i, "loss": float(i)} for i in (1, 2, 3, 4)]
    (run / "round1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))


def _main(monkeypatch, capsys, *argv: str) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["run_diagnostics.py", *argv])
    run_diagnostics.main()
    return capsys.readouterr().out.splitlines()


def test_pseudo_counts_per_class_and_seed(tmp_path, monkeypatch, capsys):
    _self_training_run(tmp_path, "dars", 0, [300, 20, 0], [150, 20, 0], (0.25, 0.0625))
    _self_training_run(tmp_path, "dars", 1, [1000, 0, 5], [1000, 0, 5], (1.5, -1e-11))
    out = _main(
        monkeypatch,
        capsys,
        str(tmp_path),
        "--methods",
        "dars",
        "--seeds",
        "0",
        "1",
        "--pseudo-counts",
    )
    assert (
        out[0]
        == "| class | labeled % | dars s0 thresholded / written | dars s1 thresholded / written |"
    )
    assert out[2] == "| Road | 50.00 | 300 / 150 | 1,000 / 1,000 |"
    assert out[4] == "| Pole | 20.00 | 0 / 0 | 5 / 5 |"
    assert out[5] == "| total | 100 | 320 / 170 | 1,005 / 1,005 |"
    assert out[6] == "| KL to labeled | | 0.2500 / 0.0625 | 1.5000 / 0.0000 |"


def test_logged_means_read_the_last_round(tmp_path, monkeypatch, capsys):
    _self_training_run(tmp_path, "st", 0, [1, 1, 1], [1, 1, 1], (0.0, 0.0))
    out = _main(
        monkeypatch, capsys, str(tmp_path), "--methods", "st", "--keys", "loss", "--digits", "1"
    )
    assert out[-1] == "| st | 0 | 1.5 / 3.5 |"


def test_a_run_without_rounds_is_named(tmp_path, monkeypatch, capsys):
    run = tmp_path / "supervised" / "seed0"
    run.mkdir(parents=True)
    (run / "final.json").write_text(json.dumps({"final": {"miou": 0.5}, "rounds": []}))
    with pytest.raises(SystemExit, match="has no self-training round 1"):
        _main(monkeypatch, capsys, str(tmp_path), "--methods", "supervised", "--pseudo-counts")


def _finished_run(root: Path, method: str, seed: int, final: dict) -> None:
    run = root / method / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "final.json").write_text(json.dumps({"final": final, "rounds": []}))


def test_final_groups_and_paired_gains(tmp_path, monkeypatch, capsys):
    # Gains on "large" (mean of Road and Car): seed 0 (0.92+0.44)/2 - (0.90+0.40)/2 = +3.0
    # points, seed 1 (0.96+0.44)/2 - (0.90+0.40)/2 = +5.0: mean +4.00, SE stdev/sqrt(2) = 1.00.
    _finished_run(tmp_path, "base", 0, {"iou/Road": 0.90, "iou/Car": 0.40, "iou/Pole": 0.10})
    _finished_run(tmp_path, "base", 1, {"iou/Road": 0.90, "iou/Car": 0.40, "iou/Pole": 0.20})
    _finished_run(tmp_path, "semi", 0, {"iou/Road": 0.92, "iou/Car": 0.44, "iou/Pole": 0.05})
    _finished_run(tmp_path, "semi", 1, {"iou/Road": 0.96, "iou/Car": 0.44, "iou/Pole": 0.15})
    out = _main(
        monkeypatch,
        capsys,
        str(tmp_path),
        "--methods",
        "base",
        "semi",
        "--seeds",
        "0",
        "1",
        "--group",
        "large=iou/Road,iou/Car",
        "--paired",
        "base",
        "--final",
        "large",
        "iou/Pole",
    )
    assert out[0] == "| method | large | iou/Pole |"
    assert out[2] == "| base | 65.0 | 15.0 |"
    assert out[3] == "| semi | 69.0 | 10.0 |"
    assert out[4] == "| semi - base | +4.00 ± 1.00 | -5.00 ± 0.00 |"


@pytest.mark.parametrize(
    "group, message",
    [
        ("large=iou/Road,iou/Car", r"final\.json has no iou/Car \(group 'large'\)"),
        ("large", "expected NAME=KEY"),
    ],
)
def test_a_bad_group_is_named(tmp_path, monkeypatch, capsys, group, message):
    _finished_run(tmp_path, "base", 0, {"iou/Road": 0.9})
    argv = ["--methods", "base", "--group", group, "--final", "large"]
    with pytest.raises(SystemExit, match=message):
        _main(monkeypatch, capsys, str(tmp_path), *argv)
