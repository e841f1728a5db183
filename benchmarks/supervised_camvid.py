"""Supervised-only baseline on CamVid at CPU scale: val mIoU and seconds per iteration.

Trains the preset `configs/supervised_deeplabv3plus-effl0_camvid-1_8_cpu.yaml` (1/8 of
CamVid train labeled, DeepLabV3+ EfficientNet-Lite0) once per seed and prints a markdown
table. Runs live under --runs and resume if interrupted; a finished run is re-read, not
retrained. CamVid is read in place from ../shared/data/camvid (or --camvid).

    python benchmarks/supervised_camvid.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from semiseg.config import load_config
from semiseg.metrics_log import read_metrics
from semiseg.run_folder import RunFolder
from semiseg.training import train

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "supervised_deeplabv3plus-effl0_camvid-1_8_cpu.yaml"


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.runs) / f"seed{seed}"
    overrides = [f"train.seed={seed}", f"output_dir={out}", f"data.root={args.camvid}"]
    overrides += [
        f"data.{name}={REPO / 'splits/camvid/1_8' / f'{name}.txt'}"
        for name in ("labeled", "unlabeled", "val")
    ]
    overrides += args.overrides
    cfg = load_config(PRESET, overrides)
    start = time.perf_counter()
    result = train(cfg, progress=not args.no_progress)
    wall = time.perf_counter() - start
    records = read_metrics(RunFolder(out).metrics)
    # The first logging window includes data-loader start-up; the median ignores it.
    sec = statistics.median(r["sec_per_iter"] for r in records if r["split"] == "train")
    final = [r for r in records if r["split"] == "val"][-1]
    return {
        "seed": seed,
        "iterations": result["iteration"],
        "final_miou": final["miou"],
        "best_miou": result["best_miou"],
        "tail_miou": final.get("tail_miou"),
        "sec_per_iter": sec,
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--camvid", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench_supervised_camvid"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args()
    if not Path(args.camvid).is_dir():
        print(f"CamVid not found at {args.camvid}; pass --camvid", file=sys.stderr)
        return 2
    rows = [run_seed(seed, args) for seed in args.seeds]
    print(
        "\n| seed | iterations | val mIoU (%) | best mIoU (%) | tail mIoU (%) | s/iter | wall (min) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['iterations']} | {100 * r['final_miou']:.2f} | {100 * r['best_miou']:.2f} "
            f"| {100 * r['tail_miou']:.2f} | {r['sec_per_iter']:.2f} | {r['wall_s'] / 60:.1f} |"
        )
    if len(rows) > 1:
        mious = [100 * r["final_miou"] for r in rows]
        print(
            f"\nval mIoU over {len(rows)} seeds: {statistics.mean(mious):.2f} +- {statistics.stdev(mious):.2f}"
        )
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
