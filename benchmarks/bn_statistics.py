"""How much a trained network's BatchNorm running statistics cost it at evaluation.

For each checkpoint: the whole-set mIoU with the statistics it was trained with, then with
them re-estimated over clean training crops (`semiseg.models.batchnorm.recalibrate_batchnorm`:
the run's weak augmentation, its labeled and unlabeled images, no strong views, no feature
perturbation), on the run's val list and on a development list (by default the run's
unlabeled list, whose masks no training loss reads). A semi-supervised run whose statistics
were gathered over strong views and perturbed features gains from the re-estimate; a
supervised run, whose statistics already come from such crops, should not move.

    python benchmarks/bn_statistics.py RUN_A/latest.pt RUN_B/latest.pt --batches 50
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from semiseg.data.dataset import SegmentationDataset
from semiseg.data.formats import get_format
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import TrainTransform, eval_transform
from semiseg.evaluation import evaluate
from semiseg.inference import load_trained_model
from semiseg.models.batchnorm import recalibrate_batchnorm


def scores(model, cfg, samples, fmt, num_classes, device) -> tuple[float, float]:
    data = cfg.data
    size = data.eval_size or data.crop_size
    dataset = SegmentationDataset(
        samples, fmt, eval_transform(data.eval_mode, size), with_mask=True
    )
    result = evaluate(
        model,
        DataLoader(dataset, batch_size=1, num_workers=1),
        num_classes,
        device=device,
        mode=data.eval_mode,
        window=size,
        tail_classes=cfg.eval.tail_classes,
        progress=False,
    )
    return 100 * result.miou, 100 * (result.tail_miou or 0.0)


def clean_crops(cfg, fmt, batch_size: int, seed: int):
    """Weakly augmented crops of the run's labeled and unlabeled images, shuffled."""
    data = cfg.data
    root = Path(data.root)
    samples = read_split(resolve_list(data.labeled, root), root, require_mask=False)
    if data.unlabeled:
        samples += read_split(resolve_list(data.unlabeled, root), root, require_mask=False)
    transform = TrainTransform(data.crop_size, tuple(data.scale_range), hflip=data.hflip)
    dataset = SegmentationDataset(samples, fmt, transform, with_mask=False)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=1,
        generator=torch.Generator().manual_seed(seed),
    )
    return (batch["image"] for batch in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--batches", type=int, default=50, help="clean batches to re-estimate with")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dev", help="development split list (default: the run's unlabeled list)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    print(
        f"mIoU / tail mIoU (%) with the trained BatchNorm statistics and with them re-estimated over "
        f"{args.batches} batches of {args.batch_size} clean training crops\n"
    )
    print("| checkpoint | val: trained | val: re-estimated | dev: trained | dev: re-estimated |")
    print("|---|---:|---:|---:|---:|")
    for path in args.checkpoints:
        model, cfg, ckpt = load_trained_model(path, device)
        num_classes = ckpt["num_classes"]
        fmt = get_format(cfg.data.format, num_classes, ckpt["class_names"])
        root = Path(cfg.data.root)
        val = read_split(resolve_list(cfg.data.val, root), root, require_mask=True)
        dev_list = args.dev or cfg.data.unlabeled
        dev = read_split(resolve_list(dev_list, root), root, require_mask=True)
        before = [scores(model, cfg, s, fmt, num_classes, device) for s in (val, dev)]
        crops = clean_crops(cfg, fmt, args.batch_size, args.seed)
        recalibrate_batchnorm(model, itertools.islice(crops, args.batches), device)
        after = [scores(model, cfg, s, fmt, num_classes, device) for s in (val, dev)]
        cells = [f"{m:.2f} / {t:.2f}" for m, t in (before[0], after[0], before[1], after[1])]
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
