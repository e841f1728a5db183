"""benchmarks/learning_curve.py: paired curves, each run against its pair, seed tables."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_benchmark, tiny_config, write_grid

learning_curve = load_benchmark("learning_curve")


def _run(folder: Path, evals: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"iteration": i, "split": "val", "miou": m}) for i, m in evals]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_curves_pairs_and_seed_tables(synthetic_root, tmp_path, capsys):
    grid = write_grid(
        tmp_path,
        tiny_config(synthetic_root, tmp_path / "unused"),
        {"supervised": [], "x": ["scheme.name=fixmatch"]},
    )
    out = tmp_path / "bench"
    # The tiny config trains 12 iterations: midpoint 6, last fifth 9.6..12.
    _run(out / "supervised" / "seed0", [(4, 0.30), (8, 0.40), (12, 0.50)])
    _run(out / "supervised" / "seed1", [(4, 0.20), (8, 0.30), (12, 0.40)])
    _run(out / "x" / "seed0", [(4, 0.32), (8, 0.38), (12, 0.47)])
    # Seed 1 of x is still training: only its first evaluation is in.
    _run(out / "x" / "seed1", [(4, 0.25)])
    learning_curve.main([str(grid), "--methods", "x", "--seed-tables", "4"])
    printed = capsys.readouterr().out
    # At 4: gains +2 and +5 (mean 3.5, SE 1.5); at 12 one pair, -3.
    assert "| 4 | 25.00 ± 7.07 | 28.50 ± 4.95 | +3.50 ± 1.50 | 2 |" in printed
    assert "| 12 | 45.00 ± 7.07 | 47.00 ± 0.00 | -3.00 ± - | 1 |" in printed
    # Seed 0 of x: gains +2, -2, -3 (below at 2 of 3, mean -1); from 6 on -2.5; last fifth -3.
    assert "| x | 0 | 3 | 2 | -1.00 | -2.50 | -3.00 |" in printed
    assert "| x | 1 | 1 | 0 | +5.00 | - | - |" in printed
    assert "| supervised | 30.00 | 40.00 | 50.00 |" in printed
    assert "| x | 25.00 | - | - |" in printed
