"""`semiseg` command line: train, eval, predict, split, pseudo-label, detector, bench, plot, quickstart."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from semiseg.config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from semiseg.config import load_config
    from semiseg.evaluation import format_score_dict
    from semiseg.training import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, restart=args.restart, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.get("final") is not None:
        print(f"\nfinal evaluation (iteration {result['iteration']}):")
        print(format_score_dict(result["final"]))
        print(
            f"best val mIoU {100 * result['best_miou']:.2f} at iteration {result['best_iteration']}"
        )
    for r in result.get("rounds", []):
        if r.get("miou") is not None:
            kl = f", pseudo-label KL {r['kl_final']:.4f}" if r.get("kl_final") is not None else ""
            print(f"round {r['round']}: val mIoU {100 * r['miou']:.2f}{kl}")
    return 0


def _cmd_pseudo_label(args: argparse.Namespace) -> int:
    from semiseg.offline.label_set import GeneratorSpec, format_stats, pseudo_label_checkpoint

    try:
        spec = GeneratorSpec(
            method=args.method,
            alpha=None if args.threshold is not None else args.alpha,
            threshold=args.threshold,
            temperature=args.temperature,
            variant=args.variant,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    stats, names = pseudo_label_checkpoint(
        args.checkpoint,
        args.out,
        spec,
        data_root=args.data_root,
        unlabeled=args.unlabeled,
        labeled=args.labeled,
        flip=not args.no_flip,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        keep_cache=args.keep_cache,
    )
    if stats:
        print(format_stats(stats, names))
        print(f"labels and {Path(args.out) / 'list.txt'} (for data.pseudo_labeled) in {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from semiseg.inference import evaluate_checkpoint

    scores, names = evaluate_checkpoint(
        args.checkpoint,
        data_root=args.data_root,
        val_list=args.val,
        mode=args.mode,
        size=args.size,
        device=args.device,
        tail_classes=args.tail,
    )
    from semiseg.evaluation import format_scores

    print(format_scores(scores, names))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from semiseg.inference import predict_folder

    written = predict_folder(
        args.checkpoint, args.input, args.output, mode=args.mode, size=args.size, device=args.device
    )
    print(f"wrote {written} masks to {args.output}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from semiseg.data.formats import get_format, require_masks
    from semiseg.data.splits import make_split, parse_fraction, read_split, write_split

    root = Path(args.root)
    if args.list:
        samples = read_split(Path(args.list), root, require_mask=False)
    else:
        samples = get_format(args.format, args.num_classes).list_samples(root, args.subset)
    fraction = parse_fraction(args.fraction) if args.fraction else None
    labeled, unlabeled = make_split(samples, fraction=fraction, count=args.count, seed=args.seed)
    out = Path(args.out)
    write_split(out / "labeled.txt", labeled, root)
    write_split(out / "unlabeled.txt", unlabeled, root)
    image_only = sum(s.mask is None for s in samples)
    note = f" ({image_only} images without a mask, all unlabeled)" if image_only else ""
    print(f"{len(labeled)} labeled, {len(unlabeled)} unlabeled of {len(samples)}{note} -> {out}")
    if not args.list and args.val_subset:
        val = get_format(args.format, args.num_classes).list_samples(root, args.val_subset)
        val = require_masks(val, f"{root}: subset '{args.val_subset}'")
        write_split(out / "val.txt", val, root)
        print(f"{len(val)} val samples ('{args.val_subset}') -> {out / 'val.txt'}")
    return 0


def _cmd_detector(args: argparse.Namespace) -> int:
    from semiseg.config import load_config
    from semiseg.data.formats import get_format
    from semiseg.data.splits import read_split, resolve_list
    from semiseg.distributed import resolve_device
    from semiseg.offline import detector_training as detection

    cfg = load_config(args.config, args.overrides)
    root = Path(cfg.data.root)
    fmt = get_format(cfg.data.format, cfg.data.num_classes, cfg.data.class_names, root=root)
    device = resolve_device(cfg.train.device)
    progress = not args.no_progress
    if args.action == "train":
        samples = read_split(resolve_list(cfg.data.labeled, root), root, require_mask=True)
        print(
            f"detector checkpoint: {detection.train_detector(cfg, samples, fmt, device, progress)}"
        )
        return 0
    if not cfg.data.unlabeled:
        raise ConfigError(
            "detector detect/eval need data.unlabeled (the images the detections are for)"
        )
    samples = read_split(
        resolve_list(cfg.data.unlabeled, root), root, require_mask=args.action == "eval"
    )
    if args.action == "detect":
        print(f"detections in {detection.detect(cfg, samples, device, progress)}")
        return 0
    det = detection.detector_options(cfg)
    results = [detection.box_accuracy(cfg, samples, fmt, iou) for iou in args.iou]
    names = fmt.class_names or [str(c) for c in range(fmt.num_classes)]
    accuracies = ", ".join(
        f"{100 * r['accuracy']:.1f} % at IoU >= {iou}"
        for r, iou in zip(results, args.iou, strict=True)
    )
    print(
        f"{results[0]['detections']} detections (score >= {det.score_threshold}), box accuracy: {accuracies}"
    )
    for c, count in results[0]["per_class_count"].items():
        shown = [
            "-" if r["per_class"][c] is None else f"{100 * r['per_class'][c]:.1f} %"
            for r in results
        ]
        print(f"  {names[c]:<14}{count:>6} boxes  " + "  ".join(f"{cell:>8}" for cell in shown))
    if args.checkpoint:
        agreement = detection.pixel_box_accuracy(
            cfg, args.checkpoint, samples, fmt, device, progress
        )
        print(
            f"pseudo-label precision of {args.checkpoint} (confidence >= {agreement['threshold']}), % (pixels):"
        )
        print(f"  {'':<14}" + "".join(f"{name:>24}" for name in agreement["groups"]))
        for key, label in [(c, names[c]) for c in det.classes] + [("things", "all listed")]:
            cells = []
            for group in agreement["groups"].values():
                acc, pixels = (
                    (group["things"], group["things_pixels"])
                    if key == "things"
                    else (group["per_class"][key], group["per_class_pixels"][key])
                )
                cells.append(f"{'-' if acc is None else f'{100 * acc:.1f}'} ({pixels})")
            print(f"  {label:<14}" + "".join(f"{cell:>24}" for cell in cells))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from semiseg.bench import (
        finished_results,
        keep_records,
        last_fifth_table,
        load_grid,
        machines_table,
        markdown_table,
        run_grid,
        summarize,
        write_report,
    )

    grid = load_grid(args.grid)
    if args.status:
        from semiseg.bench_status import grid_status, status_table

        print(status_table(grid, grid_status(grid)))
        return 0
    if args.report:
        keep_records(grid)
        results = finished_results(grid)
    else:
        results = run_grid(
            grid, progress=not args.no_progress, methods=args.methods, seeds=args.seeds
        )
    if not results:
        print("no finished runs yet", file=sys.stderr)
        return 1
    rows = summarize(grid, results)
    machines = machines_table(results)
    path = write_report(
        grid, rows, command=" ".join(["semiseg", "bench", args.grid]), machines=machines
    )
    print(markdown_table(grid, rows))
    fifth = last_fifth_table(grid, rows)
    if fifth:
        print(f"mean over each run's evaluations in the last fifth of its schedule:\n\n{fifth}")
    if machines:
        print(machines)
    print(f"table, CSV and bar plot in {path.parent}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from semiseg.config import load_saved_config
    from semiseg.data.formats import get_format
    from semiseg.report import plot_run
    from semiseg.run_folder import RunFolder

    run = RunFolder(args.run)
    if not run.is_run():
        raise FileNotFoundError(
            f"{run.path} is not a run folder (no {run.metrics.name} / {run.config.name})"
        )
    cfg = load_saved_config(run.config)
    fmt = get_format(
        cfg.data.format, cfg.data.num_classes, cfg.data.class_names, root=Path(cfg.data.root)
    )
    compare = [Path(other) for other in args.compare or []]
    for other in compare:
        if not RunFolder(other).metrics.is_file():
            raise FileNotFoundError(
                f"{other} is not a run folder (no {RunFolder(other).metrics.name})"
            )
    try:
        paths = plot_run(run.path, fmt.num_classes, args.iterations, compare, fmt.class_names)
    except ValueError as err:  # the metrics lack what a figure needs: say which, no traceback
        print(f"semiseg plot: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from semiseg.export import export_checkpoint

    described = export_checkpoint(
        args.checkpoint, args.out, args.format, tuple(args.size) if args.size else None
    )
    print(
        f"wrote {args.out} ({args.format}) and {described}; input: RGB float32 [N, 3, H, W] in [0, 1], see the JSON"
    )
    return 0


def _cmd_components(args: argparse.Namespace) -> int:
    from semiseg import components
    from semiseg.files import atomic_write_text

    if args.readme:
        path = Path(args.readme)
        atomic_write_text(path, components.with_readme_block(path.read_text()))
        print(f"updated the component tables in {path}")
    elif args.markdown:
        print(components.markdown(), end="")
    else:
        titles = {"scheme": "schemes", "policy": "policies", "loss": "unlabeled losses"}
        for kind, registry in components.registries().items():
            print(f"{titles.get(kind, kind)} (`{kind}.name`, default {registry.default!r}):")
            for component in registry:
                print(f"  {component.name:<14} {component.summary}")
                print(f"  {'':<14} options: {components.options_text(component.Options)}")
        every = components.combinations()
        refused = [c for c in every if c.refused is not None]
        print(
            f"\n{len(every) - len(refused)} of {len(every)} scheme x policy x loss combinations train; refused:"
        )
        for reason in sorted({c.refused for c in refused}):
            print(f"  {reason}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from semiseg.quickstart import run_quickstart

    run_quickstart(Path(args.out), iterations=args.iterations, restart=args.restart)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config (resumes from OUTPUT_DIR/latest.pt)")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01 train.iterations=500"
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="ignore an existing checkpoint and train from scratch",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (logs still written)"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint on its validation set; prints per-class IoU"
    )
    p.add_argument("checkpoint", help="a semiseg checkpoint (RUN/best.pt or RUN/latest.pt)")
    p.add_argument(
        "--data-root", help="dataset folder (default: the one in the checkpoint's config)"
    )
    p.add_argument("--val", help="validation split list (default: the checkpoint's)")
    p.add_argument(
        "--mode",
        choices=["none", "resize", "sliding"],
        help="evaluation mode (default: the checkpoint's)",
    )
    p.add_argument("--size", type=int, help="resize shorter side or sliding window size")
    p.add_argument("--tail", type=int, nargs="*", help="class indices reported as tail mIoU")
    p.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="write colour-palette mask PNGs for a folder of images")
    p.add_argument("checkpoint", help="a semiseg checkpoint (RUN/best.pt or RUN/latest.pt)")
    p.add_argument("input", help="folder of images (png/jpg/jpeg/bmp)")
    p.add_argument("output", help="folder for the predicted masks")
    p.add_argument(
        "--mode",
        choices=["none", "resize", "sliding"],
        help="full image, resized (shorter side --size) or sliding windows (default: the checkpoint's data.eval_mode)",
    )
    p.add_argument(
        "--size",
        type=int,
        help="resize shorter side or sliding window size (default: the checkpoint's)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("split", help="write labeled/unlabeled (and val) split lists, seeded")
    p.add_argument("--format", default="folder", choices=["folder", "voc", "cityscapes", "camvid"])
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument(
        "--subset", default="train", help="the format's training subset to split (default: train)"
    )
    p.add_argument("--list", help="split this list file instead of the format's subset")
    p.add_argument(
        "--val-subset", default="val", help="also write val.txt from this subset ('' to skip)"
    )
    p.add_argument("--num-classes", type=int, help="for the folder format without classes.txt")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--fraction", help="labeled fraction of the images that have a mask: 1/8, 0.125 or 1_8"
    )
    group.add_argument(
        "--count", type=int, help="number of labeled samples (among the images that have a mask)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for labeled.txt / unlabeled.txt / val.txt")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser(
        "pseudo-label", help="label a checkpoint's unlabeled set offline (ST, CBST, DA, DARS)"
    )
    p.add_argument("checkpoint", help="teacher checkpoint (its config names the data)")
    p.add_argument("out", help="output folder: labels/, list.txt, stats.json (resumable)")
    p.add_argument("--method", choices=["st", "cbst", "da", "dars"], default="dars")
    p.add_argument("--alpha", type=float, default=0.2, help="labeling ratio (default 0.2)")
    p.add_argument(
        "--threshold", type=float, help="ST with this confidence threshold instead of --alpha"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="temperature scaling (the DARS paper's TS: 1.27)",
    )
    p.add_argument("--variant", choices=["paper", "official"], default="paper")
    p.add_argument(
        "--no-flip", action="store_true", help="do not average the teacher over a horizontal flip"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of DARS's random sampling")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument(
        "--unlabeled", help="split list to label (default: the checkpoint's data.unlabeled)"
    )
    p.add_argument(
        "--labeled",
        help="split list whose class distribution DA/DARS match (default: the checkpoint's)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep OUT/cache (the teacher's class and confidence per image)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pseudo_label)

    p = sub.add_parser(
        "detector",
        help="train the RPPI object detector on labeled masks, cache detections, score boxes",
    )
    p.add_argument(
        "action",
        choices=["train", "detect", "eval"],
        help="train on labeled images; detect on unlabeled ones; eval box accuracy (needs their masks)",
    )
    p.add_argument("config", help="YAML config with a detector section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. detector.iterations=500")
    p.add_argument(
        "--checkpoint",
        help="eval: also the precision of this segmentation checkpoint's confident pseudo labels inside and outside the boxes",
    )
    p.add_argument(
        "--iou",
        type=float,
        nargs="+",
        default=[0.8],
        help="eval: IoU(s) with a ground-truth box that make a detection correct (the supplement: 0.8)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_detector)

    p = sub.add_parser("bench", help="run a grid of methods x seeds and write a comparison table")
    p.add_argument("grid", help="grid YAML (see semiseg.bench)")
    p.add_argument("--methods", nargs="+", help="train only these methods of the grid")
    p.add_argument("--seeds", nargs="+", type=int, help="train only these seeds of the grid")
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: write the table of the runs that have finished (and keep the "
        "records of those in the run folders, for a grid with `records`)",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="train and write nothing: each run's state, last iteration, last val mIoU and the "
        "training time left",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "plot", help="draw a run's pseudo-label diagnostics (DAW fits and t*, mask ratio, accuracy)"
    )
    p.add_argument("run", help="run folder")
    p.add_argument(
        "--iterations", type=int, nargs="*", help="iterations at which to draw the DAW fits"
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        help="other runs whose pseudo-label accuracy to draw beside this one",
    )
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "export", help="the evaluated network of a checkpoint as ONNX, torch.export or TorchScript"
    )
    p.add_argument("checkpoint", help="a semiseg checkpoint (RUN/best.pt or RUN/latest.pt)")
    p.add_argument(
        "out", help="the model file to write (OUT.json beside it describes input and classes)"
    )
    p.add_argument("--format", default="onnx", choices=["onnx", "torch-export", "torchscript"])
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input height and width (default: the checkpoint's evaluation size, square)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "components",
        help="list the registered schemes, policies and losses, their options and which combine",
    )
    p.add_argument("--markdown", action="store_true", help="print the README's tables")
    p.add_argument("--readme", metavar="FILE", help="rewrite the generated block of this README")
    p.set_defaults(func=_cmd_components)

    p = sub.add_parser(
        "quickstart", help="make a synthetic dataset, train on it, print the mIoU table"
    )
    p.add_argument("--out", default="semiseg-quickstart", help="working folder (data and run)")
    p.add_argument(
        "--iterations", type=int, default=None, help="training iterations (default: the preset's)"
    )
    p.add_argument("--restart", action="store_true")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with `key=value` overrides allowed anywhere after the command
    (`semiseg train cfg.yaml --restart optim.lr=0.02`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from semiseg.checkpoint import CheckpointError
    from semiseg.data.formats import DataError
    from semiseg.stop_signals import TrainingInterrupted

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"semiseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"semiseg {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"semiseg {args.command}: interrupted; what was written is kept: run the same command to go on",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
