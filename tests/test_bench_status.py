"""`semiseg bench --status`: each run's state and the training time left, from the logs."""

from __future__ import annotations

import json
import os

from conftest import tiny_config, write_grid

from semiseg.bench import load_grid
from semiseg.bench_status import grid_status, status_table
from semiseg.cli import main


def test_status_of_finished_stopped_and_unstarted_runs(synthetic_root, tmp_path, capsys):
    base_cfg = tiny_config(
        synthetic_root, tmp_path / "unused", train={"iterations": 2, "eval_every": 2}
    )
    grid_path = write_grid(
        tmp_path,
        base_cfg,
        {"supervised": [], "part": ["train.iterations=1000"], "later": ["optim.lr=0.02"]},
        seeds=(0, 1),
    )
    assert main(["bench", str(grid_path), "--no-progress", "--methods", "supervised"]) == 0
    # part seed 0 stopped at iteration 20 of 1,000: its windows took 2, 4 and 3 s/iter
    # (median 3), its last evaluation was 45 %. 980 x 3 s = 49 min left; seed 1 has not
    # started and takes its method's speed: 1,000 x 3 s = 50 min; in all 99 min = 1.6 h.
    log = tmp_path / "bench" / "part" / "seed0" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    records = [
        {"iteration": 10, "split": "train", "sec_per_iter": 2.0},
        {"iteration": 10, "split": "val", "miou": 0.40},
        {"iteration": 15, "split": "train", "sec_per_iter": 4.0},
        {"iteration": 20, "split": "train", "sec_per_iter": 3.0},
        {"iteration": 20, "split": "val", "miou": 0.45},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.utime(log, (1_000_000, 1_000_000))

    grid = load_grid(grid_path)
    runs = {(r.method, r.seed): r for r in grid_status(grid, now=1_000_000 + 3_600)}
    assert runs["supervised", 0].state == "finished" and runs["supervised", 0].iteration == 2
    part = runs["part", 0]
    assert (part.state, part.iteration, part.planned) == ("stopped", 20, 1000)
    assert part.miou == 45.0 and part.sec_per_iter == 3.0 and part.left_seconds == 2940
    assert runs["part", 1].state == "not started" and runs["part", 1].left_seconds == 3000
    assert runs["later", 0].left_seconds is None
    table = status_table(grid, list(runs.values()))
    assert "| part | 0 | stopped, log idle 1.0 h | 20/1000 | 45.00 | 3.00 | 49 min |" in table
    assert "| part | 1 | not started | 0/1000 | - | 3.00 | 50 min |" in table
    assert "2 of 6 runs finished; 1.6 h of training left for 2 of the other runs" in table
    assert "no speed measured yet for later (2 runs)" in table
    # A log written a minute ago is a run in progress.
    assert grid_status(grid, now=1_000_000 + 60)[2].state == "writing"

    capsys.readouterr()
    assert main(["bench", str(grid_path), "--status"]) == 0
    assert "| supervised | 1 | finished | 2/2 |" in capsys.readouterr().out
    assert not (tmp_path / "bench" / "later").exists()
