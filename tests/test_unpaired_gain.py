"""benchmarks/unpaired_gain.py: rows against a baseline trained at more seeds than they are."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_benchmark, tiny_config, write_grid

unpaired_gain = load_benchmark("unpaired_gain")


def _finished_run(folder: Path, evals: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"iteration": i, "split": "val", "miou": m}) for i, m in evals]
    lines.append(json.dumps({"iteration": 10, "split": "train", "loss": 1.0, "sec_per_iter": 0.1}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "final.json").write_text(json.dumps({"iteration": evals[-1][0]}))


def test_rows_against_the_baselines_mean_over_all_its_seeds(synthetic_root, tmp_path, capsys):
    grid = write_grid(
        tmp_path,
        tiny_config(synthetic_root, tmp_path / "unused"),
        {"supervised": [], "x": ["scheme.name=fixmatch"]},
        name="g",
    )
    out = tmp_path / "bench"
    # The 12-iteration schedule's last fifth is 9.6..12: only the final evaluation.
    # supervised seeds 0-3 end at 40, 42, 44, 46 (mean 43, variance 20/3); x at 46 and 48
    # (mean 47, variance 2): gain 4, SE sqrt((20/3)/4 + 2/2) = sqrt(8/3) = 1.63, 4 > 2 SE.
    for seed, miou in enumerate([0.40, 0.42, 0.44, 0.46]):
        _finished_run(out / "supervised" / f"seed{seed}", [(6, 0.1), (12, miou)])
    _finished_run(out / "x" / "seed0", [(6, 0.1), (12, 0.46)])
    _finished_run(out / "x" / "seed1", [(6, 0.1), (12, 0.48)])
    # Seed 5 never finished: it is not read.
    (out / "supervised" / "seed5").mkdir(parents=True)
    unpaired_gain.main([str(grid), "--baseline-seeds", "0", "1", "2", "3", "5"])
    printed = capsys.readouterr().out
    assert "at seeds [0, 1, 2, 3]" in printed
    assert "| supervised | 4 | 43.00 ± 2.58 | - | - |" in printed
    assert "| x | 2 | 47.00 ± 1.41 | +4.00 ± 1.63 | yes |" in printed
    assert printed.count("| x | 2 | 47.00 ± 1.41 | +4.00 ± 1.63 | yes |") == 2
    assert "single runs 40.00 to 46.00, std 2.58" in printed
