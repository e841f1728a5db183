"""Per-class quality of a checkpoint's confident pseudo labels on images with known masks.

A threshold policy trains on the pixels whose top probability reaches the threshold. Their
overall accuracy (the `oracle/acc_used` the runs log) can be high while a rare class's
pixels are mostly labeled as a frequent one: the few wrong labels are then the tail
classes' pixels, and training on them teaches the network to drop those classes. This
script shows that split per class, for each checkpoint, on a list whose masks no training
loss read (by default the run's unlabeled list):

- `pixels`: the class's share of the list's labeled pixels;
- `used`: the share of the class's pixels that get a confident label (any class);
- `kept right`: of those, the share labeled with the right class (per-class recall among the
  used pixels; 1 - this is the share of the class taught as something else);
- `label precision`: of the confident pixels labeled with the class, the share that are it;
- `taught as`: the class most of its wrongly labeled confident pixels get.

The networks run in evaluation mode on whole images (the run's `data.eval_mode`), not on the
training-mode weak crops the schemes label, so the numbers describe the checkpoint's
labels, not exactly a step's.

    python benchmarks/pseudo_label_classes.py RUN_A/latest.pt RUN_B/latest.pt --threshold 0.95

`--labels` scores written pseudo-label sets instead (an offline self-training round's
`pseudo/` folder, whose round folder holds the config that says where the data is): a pixel
is used when the set labels it (not 255), against the images' own masks.

    python benchmarks/pseudo_label_classes.py --labels RUN/seed0/round1/pseudo

`--fuzzy-T T` adds, per class, what FPL makes of the checkpoint's probabilities (its fuzzy
positive set, Alg. 1 of the FPL paper, at cumulative bound T): the share of the class's
pixels with K > 1, where the top-1 label is not all the student is taught; of those, the
share whose true class is in the set but not first (FPL's case 2) and outside it (case 3);
and the mean K. A class taught through wide sets more often than the others is one FPL
teaches with flatter targets.

    python benchmarks/pseudo_label_classes.py RUN/latest.pt --fuzzy-T 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from semiseg.config import load_saved_config
from semiseg.data.dataset import SegmentationDataset
from semiseg.data.formats import DataError, get_format, read_label_image
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import eval_transform
from semiseg.evaluation import confusion_matrix, predict_logits
from semiseg.inference import load_trained_model
from semiseg.pseudo.fpl import fuzzy_positive_mask, gradient_score_cases, k_values
from semiseg.run_folder import PseudoLabelFolder


@torch.no_grad()
def confident_confusion(
    model, cfg, samples, fmt, num_classes, threshold, device, fuzzy_T=None, fuzzy_variant="paper"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int64 [C, C+1]: ground truth t against confident label p, column C for unused pixels;
    and, with `fuzzy_T`, the per-class fuzzy-set counts of `fuzzy_set_counts` (else None)."""
    data = cfg.data
    size = data.eval_size or data.crop_size
    dataset = SegmentationDataset(
        samples, fmt, eval_transform(data.eval_mode, size), with_mask=True
    )
    counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)
    fuzzy = None if fuzzy_T is None else torch.zeros(num_classes, 5, dtype=torch.int64)
    for batch in tqdm(DataLoader(dataset, batch_size=1, num_workers=1), leave=False):
        mask = batch["mask"].to(device)
        logits = predict_logits(
            model,
            batch["image"].to(device),
            num_classes,
            tuple(mask.shape[-2:]),
            data.eval_mode,
            size,
        )
        probs = logits.float().softmax(dim=1)
        confidence, label = probs.max(dim=1)
        label = torch.where(confidence >= threshold, label, num_classes)
        counts += confusion_matrix(label, mask, num_classes + 1)[:num_classes]
        if fuzzy is not None:
            fuzzy += fuzzy_set_counts(probs, mask, fuzzy_T, fuzzy_variant)
    return counts, fuzzy


def fuzzy_set_counts(probs: torch.Tensor, mask: torch.Tensor, T: float, variant: str = "paper"):
    """int64 [C, 5] per true class c: pixels, pixels with K > 1, of those the ones whose
    truth is in the fuzzy set but not its top-1 class (FPL case 2) and the ones whose truth is
    outside the set (case 3), and the sum of K. probs [B,C,H,W], mask [B,H,W] (255 ignored)."""
    num_classes = probs.shape[1]
    positive = fuzzy_positive_mask(probs, T, variant)
    k = k_values(positive)
    case = gradient_score_cases(probs.argmax(dim=1), positive, mask)
    valid = case > 0
    truth = mask[valid]
    wide = k[valid] > 1
    case = case[valid]
    rows = [
        torch.bincount(truth[column], minlength=num_classes)
        for column in (torch.ones_like(wide), wide, wide & (case == 2), wide & (case == 3))
    ]
    rows.append(torch.bincount(truth, weights=k[valid].double(), minlength=num_classes))
    return torch.stack([r.to(torch.int64) for r in rows], dim=1)


def fuzzy_table(fuzzy: torch.Tensor, names: list[str]) -> list[str]:
    fuzzy = fuzzy.double()
    rows = [
        "| class | K > 1 | of those, truth in set (case 2) | truth outside (case 3) | mean K |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (pixels, wide, case2, case3, k_sum) in zip(
        [*names, "all"], [*fuzzy, fuzzy.sum(dim=0)], strict=True
    ):
        rows.append(
            f"| {name} | {100 * wide / max(pixels, 1):.1f} % | {100 * case2 / max(wide, 1):.1f} % "
            f"| {100 * case3 / max(wide, 1):.1f} % | {k_sum / max(pixels, 1):.2f} |"
        )
    return rows


def written_confusion(folder: Path) -> tuple[torch.Tensor, list[str], int]:
    """int64 [C, C+1] of a written pseudo-label set against the images' own masks (column C:
    pixels the set leaves at 255), the class names and the number of images."""
    pseudo = PseudoLabelFolder(folder)
    config = folder.parent / "config.yaml"
    if not pseudo.split_list.is_file() or not config.is_file():
        raise DataError(
            f"{folder}: not a round's pseudo-label folder (needs list.txt and ../config.yaml)"
        )
    cfg = load_saved_config(config)
    root = Path(cfg.data.root)
    fmt = get_format(cfg.data.format, cfg.data.num_classes, cfg.data.class_names, root=root)
    num_classes = len(fmt.class_names)
    truth = {
        s.image: s.mask for s in read_split(resolve_list(cfg.data.unlabeled, root), root, True)
    }
    written = read_split(pseudo.split_list, root, require_mask=True)
    counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)
    for sample in tqdm(written, leave=False):
        if sample.image not in truth:
            raise DataError(f"{pseudo.split_list}: {sample.image} is not in {cfg.data.unlabeled}")
        mask = torch.from_numpy(fmt.load_mask(truth[sample.image]).astype("int64"))
        label = torch.from_numpy(read_label_image(sample.mask).astype("int64"))
        if label.shape != mask.shape:
            raise DataError(f"{sample.mask}: size {tuple(label.shape)}, mask {tuple(mask.shape)}")
        label = torch.where(label == 255, num_classes, label)
        counts += confusion_matrix(label, mask, num_classes + 1)[:num_classes]
    return counts, list(fmt.class_names), len(written)


def class_table(counts: torch.Tensor, names: list[str]) -> list[str]:
    num_classes = counts.shape[0]
    counts = counts.double()
    total = counts.sum()
    used = counts[:, :num_classes]
    rows = [
        "| class | pixels | used | kept right | label precision | taught as (share of its wrong labels) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c, name in enumerate(names):
        n_used = used[c].sum()
        wrong = used[c].clone()
        wrong[c] = 0
        top = int(wrong.argmax())
        taught = (
            f"{names[top]} ({100 * wrong[top] / wrong.sum():.0f} %)" if wrong.sum() > 0 else "-"
        )
        labeled_c = used[:, c].sum()
        rows.append(
            f"| {name} | {100 * counts[c].sum() / total:.1f} % "
            f"| {100 * n_used / counts[c].sum().clamp(min=1):.1f} % "
            f"| {100 * used[c, c] / n_used.clamp(min=1):.1f} % "
            f"| {100 * used[c, c] / labeled_c.clamp(min=1):.1f} % | {taught} |"
        )
    right = used.diagonal().sum()
    rows.append(
        f"| all | 100 % | {100 * used.sum() / total:.1f} % | {100 * right / used.sum():.1f} % "
        f"| {100 * right / used.sum():.1f} % | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument(
        "--labels", nargs="+", type=Path, default=[], help="written pseudo-label folders to score"
    )
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--list", help="split list with masks (default: the run's unlabeled list)")
    parser.add_argument(
        "--fuzzy-T", type=float, help="also count FPL's fuzzy positive sets at this bound T"
    )
    parser.add_argument("--fuzzy-variant", choices=["paper", "official"], default="paper")
    args = parser.parse_args()
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.fuzzy_T is not None and not 0 <= args.fuzzy_T <= 1:
        parser.error(f"--fuzzy-T must be in [0, 1], got {args.fuzzy_T}")
    if not args.checkpoints and not args.labels:
        parser.error("give checkpoints or --labels folders")
    for folder in args.labels:
        counts, names, images = written_confusion(folder)
        print(f"\n{folder}: written labels of {images} images\n")
        print("\n".join(class_table(counts, names)), flush=True)
    device = torch.device("cpu")
    for path in args.checkpoints:
        model, cfg, ckpt = load_trained_model(path, device)
        num_classes = ckpt["num_classes"]
        fmt = get_format(cfg.data.format, num_classes, ckpt["class_names"])
        root = Path(cfg.data.root)
        listed = args.list or cfg.data.unlabeled
        if not listed:
            parser.error(f"{path}: the run has no unlabeled list; pass --list")
        samples = read_split(resolve_list(listed, root), root, require_mask=True)
        counts, fuzzy = confident_confusion(
            model,
            cfg,
            samples,
            fmt,
            num_classes,
            args.threshold,
            device,
            args.fuzzy_T,
            args.fuzzy_variant,
        )
        names = list(ckpt["class_names"])
        print(f"\n{path}: confidence >= {args.threshold} on {len(samples)} images of {listed}\n")
        print("\n".join(class_table(counts, names)), flush=True)
        if fuzzy is not None:
            print(f"\nFPL fuzzy sets at T = {args.fuzzy_T} ({args.fuzzy_variant})\n")
            print("\n".join(fuzzy_table(fuzzy, names)), flush=True)


if __name__ == "__main__":
    main()
