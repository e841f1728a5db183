"""Tabulate logged training diagnostics of bench runs: the mean of each metric over the first
and the last part of training, per method and seed (markdown).

    python benchmarks/run_diagnostics.py runs/bench/camvid-1_8-cpu \
        --methods unimatch unimatch-ppw --seeds 0 1 \
        --keys mask_ratio oracle/acc_used oracle/acc_weighted policy/mean_rank_weight

Each cell is "first / last" (with `--parts 2`: first half / second half of the logged
steps). Metrics a run never logged print as "-"; NaN entries (no such pixels in a batch)
are skipped when averaging.

`--final iou/Pedestrian iou/Bicyclist ...` instead tabulates final evaluation scores
(RUN/final.json), one row per method, averaged over the seeds, in percent. `--group
large=iou/Sky,iou/Road,...` adds a score, the mean of those keys, that `--final` can name;
`--paired supervised` adds each method's paired gain over that row, mean ± standard error
over the seeds both ran:

    python benchmarks/run_diagnostics.py runs/bench/camvid-1_16-cpu-v4 \
        --methods supervised fixmatch --seeds 0 1 2 --paired supervised \
        --group large=iou/Sky,iou/Building,iou/Road,iou/Pavement,iou/Tree,iou/Car \
        --final miou large tail_miou

`--pseudo-counts` tabulates what each self-training round labeled: per class, the share of
the labeled set's pixels, then for every method and seed the pixels that reached the
thresholds and the pixels written (they differ only where a method samples, as DARS does),
with the KL divergence of the written labels to the labeled class distribution (DARS
Table 5). Read from RUN/final.json's rounds and RUN/round<k>/pseudo/stats.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from semiseg.metrics_log import read_metrics
from semiseg.run_folder import RunFolder
from semiseg.stats import paired_mean_se


def part_means(records: list[dict], key: str, parts: int) -> tuple[float, float] | None:
    """Mean of `key` over the first and over the last of `parts` equal runs of logged steps."""
    values = [
        r[key] for r in records if r["split"] == "train" and key in r and math.isfinite(r[key])
    ]
    if not values:
        return None
    size = max(1, len(values) // parts)
    first, last = values[:size], values[-size:]
    return sum(first) / len(first), sum(last) / len(last)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", type=Path, help="bench output folder (METHOD/seedN/metrics.jsonl below it)"
    )
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--keys", nargs="+", help="metric names as logged")
    parser.add_argument(
        "--final", nargs="+", help="final evaluation scores (final.json), mean over seeds"
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=KEY,KEY,...",
        help="with --final: a score that is the mean of these final.json keys",
    )
    parser.add_argument(
        "--paired", metavar="BASELINE", help="with --final: paired gains over this method"
    )
    parser.add_argument(
        "--pseudo-counts",
        action="store_true",
        help="per-class pixel counts of the self-training rounds' pseudo labels",
    )
    parser.add_argument("--round", type=int, default=1, help="with --pseudo-counts")
    parser.add_argument(
        "--parts", type=int, default=2, help="compare the first and last 1/parts of training"
    )
    parser.add_argument("--digits", type=int, default=3)
    args = parser.parse_args()
    if sum(map(bool, (args.keys, args.final, args.pseudo_counts))) != 1:
        parser.error("give one of --keys, --final and --pseudo-counts")
    if (args.group or args.paired) and not args.final:
        parser.error("--group and --paired go with --final")
    if args.final:
        print_final(args)
        return
    if args.pseudo_counts:
        print_pseudo_counts(args)
        return

    print("| method | seed | " + " | ".join(args.keys) + " |")
    print("|---|---:|" + "---:|" * len(args.keys))
    for method in args.methods:
        for seed in args.seeds:
            path = RunFolder(args.root / method / f"seed{seed}").metrics_folder().metrics
            if not path.is_file():
                raise SystemExit(f"no metrics log at {path}")
            records = read_metrics(path)
            cells = []
            for key in args.keys:
                means = part_means(records, key, args.parts)
                cells.append(
                    "-"
                    if means is None
                    else f"{means[0]:.{args.digits}f} / {means[1]:.{args.digits}f}"
                )
            print(f"| {method} | {seed} | " + " | ".join(cells) + " |")


def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    """`NAME=KEY,KEY,...` options as {NAME: [KEY, ...]}."""
    groups = {}
    for spec in specs:
        name, sep, keys = spec.partition("=")
        members = [k for k in keys.split(",") if k]
        if not sep or not name or not members:
            raise SystemExit(f"--group {spec!r}: expected NAME=KEY,KEY,...")
        groups[name] = members
    return groups


def final_scores(root: Path, method: str, seed: int, groups: dict[str, list[str]]) -> dict:
    """A run's final scores in percent, with each group's mean added under its name."""
    path = RunFolder(root / method / f"seed{seed}").final
    if not path.is_file():
        raise SystemExit(f"no final scores at {path} (is the run finished?)")
    final = json.loads(path.read_text())["final"]
    scores = {key: 100 * value for key, value in final.items()}
    for name, members in groups.items():
        missing = [k for k in members if k not in scores]
        if missing:
            raise SystemExit(f"{path} has no {', '.join(missing)} (group {name!r})")
        scores[name] = sum(scores[k] for k in members) / len(members)
    return scores


def print_final(args: argparse.Namespace) -> None:
    groups = parse_groups(args.group)
    if args.paired and args.paired not in args.methods:
        raise SystemExit(f"--paired {args.paired!r} is not one of --methods")
    scores = {
        method: {seed: final_scores(args.root, method, seed, groups) for seed in args.seeds}
        for method in args.methods
    }
    print("| method | " + " | ".join(args.final) + " |")
    print("|---|" + "---:|" * len(args.final))
    for method in args.methods:
        cells = []
        for key in args.final:
            values = [s[key] for s in scores[method].values() if key in s]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")
    if not args.paired:
        return
    base = scores[args.paired]
    for method in args.methods:
        if method == args.paired:
            continue
        cells = []
        for key in args.final:
            diffs = [
                s[key] - base[seed][key]
                for seed, s in scores[method].items()
                if key in s and key in base[seed]
            ]
            gain, se = paired_mean_se(diffs)
            cells.append(
                "-" if gain is None else f"{gain:+.2f}" + ("" if se is None else f" ± {se:.2f}")
            )
        print(f"| {method} - {args.paired} | " + " | ".join(cells) + " |")


def round_counts(run: RunFolder, k: int) -> tuple[list[str], dict, dict]:
    """Class names (in the model's order), round k's record from final.json and that
    round's generation statistics."""
    final = run.read_final()
    if final is None:
        raise SystemExit(f"no final scores at {run.final} (is the run finished?)")
    rounds = {r["round"]: r for r in final.get("rounds", [])}
    if k not in rounds or "final" not in rounds[k]:
        raise SystemExit(f"{run.final} has no self-training round {k}")
    names = [key[len("iou/") :] for key in final["final"] if key.startswith("iou/")]
    stats_path = run.round(k).pseudo_labels / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return names, rounds[k], stats


def print_pseudo_counts(args: argparse.Namespace) -> None:
    columns, names, ratio = [], None, None
    for method in args.methods:
        for seed in args.seeds:
            names, record, stats = round_counts(
                RunFolder(args.root / method / f"seed{seed}"), args.round
            )
            ratio = ratio or stats.get("labeled_ratio")
            columns.append((f"{method} s{seed}", record))
    header = "| class | labeled % | " + " | ".join(f"{c} thresholded / written" for c, _ in columns)
    print(header + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for j, name in enumerate(names):
        share = f"{100 * ratio[j]:.2f}" if ratio else "-"
        cells = [f"{r['thresholded'][j]:,} / {r['final'][j]:,}" for _, r in columns]
        print(f"| {name} | {share} | " + " | ".join(cells) + " |")
    totals = [f"{sum(r['thresholded']):,} / {sum(r['final']):,}" for _, r in columns]
    print("| total | 100 | " + " | ".join(totals) + " |")
    # Records written before dars.kl_divergence clamped at 0 hold about -1e-11 at the target.
    kls = [
        f"{max(r['kl_thresholded'], 0.0):.4f} / {max(r['kl_final'], 0.0):.4f}" for _, r in columns
    ]
    print("| KL to labeled | | " + " | ".join(kls) + " |")


if __name__ == "__main__":
    main()
