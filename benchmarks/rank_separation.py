"""Do rank statistics tell right from wrong confident pseudo labels on a trained model?

The rank-statistics paper's premise (Sec. 3.4, Fig. 5): the top-k feature indices of a
correctly pseudo-labeled pixel overlap those of its class prototype more than those of a
wrongly labeled one. This script measures it on a segmentation checkpoint: prototypes are
the mean decoder features of each class over every labeled image (ground-truth masks; the
ideal, full-memory version of the training-time banks), and for the confident (>= the
threshold) pixels of unlabeled images it compares the weight W = s/k of the predicted class
between right and wrong predictions (masks of unlabeled images: evaluation only), for
several k, and the cosine similarity (Fig. 6) for reference.

    python benchmarks/rank_separation.py runs/bench/camvid-1_8-cpu-burnin/supervised/seed0/latest.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from semiseg.data.dataset import SegmentationDataset
from semiseg.data.formats import get_format
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import eval_transform
from semiseg.inference import load_trained_model
from semiseg.pseudo.rankweight import cosine_table, rank_overlap


@torch.no_grad()
def features_of(
    model, dataset: SegmentationDataset
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(features [D,h,w], mask [h,w], probabilities [C,h,w]) per image, on the feature grid."""
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = model(item["image"][None])
        grid = pred.features.shape[-2:]
        mask = F.interpolate(item["mask"][None, None].float(), size=grid, mode="nearest")[
            0, 0
        ].long()
        probs = F.interpolate(
            pred.logits.float(), size=grid, mode="bilinear", align_corners=False
        ).softmax(1)[0]
        out.append((pred.features[0], mask, probs))
    return out


def class_prototypes(items, num_classes: int) -> torch.Tensor:
    dim = items[0][0].shape[0]
    total, count = torch.zeros(num_classes, dim), torch.zeros(num_classes)
    for feats, mask, _ in items:
        flat, labels = feats.permute(1, 2, 0).reshape(-1, dim), mask.reshape(-1)
        known = labels != 255
        total.index_add_(0, labels[known], flat[known])
        count += torch.bincount(labels[known], minlength=num_classes).float()
    return total / count.clamp(min=1).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=64, help="unlabeled images to score")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg, _ = load_trained_model(args.checkpoint, torch.device("cpu"))
    root = Path(cfg.data.root)
    fmt = get_format(cfg.data.format, cfg.data.num_classes, cfg.data.class_names, root=root)
    transform = eval_transform(cfg.data.eval_mode, cfg.data.eval_size or cfg.data.crop_size)
    labeled = read_split(resolve_list(cfg.data.labeled, root), root, require_mask=True)
    unlabeled = read_split(resolve_list(cfg.data.unlabeled, root), root, require_mask=True)[
        : args.images
    ]
    prototypes = class_prototypes(
        features_of(model, SegmentationDataset(labeled, fmt, transform, with_mask=True)),
        fmt.num_classes,
    )
    scored = features_of(model, SegmentationDataset(unlabeled, fmt, transform, with_mask=True))

    picked = []
    for feats, mask, probs in scored:
        conf, pred = probs.max(0)
        keep = (mask != 255) & (conf >= args.threshold)
        picked.append((feats, pred, keep, (pred == mask) & keep, ~(pred == mask) & keep))
    right = sum(int(p[3].sum()) for p in picked)
    wrong = sum(int(p[4].sum()) for p in picked)
    print(
        f"{args.checkpoint}: {len(labeled)} labeled images for the prototypes, {len(scored)} unlabeled images scored"
    )
    print(
        f"confident pixels (>= {args.threshold}): {right + wrong}, of which wrong: {wrong} ({wrong / max(right + wrong, 1):.1%})\n"
    )
    print("| similarity | mean W, right PL | mean W, wrong PL | W = 0, right | W = 0, wrong |")
    print("|---|---:|---:|---:|---:|")
    measures = [
        (f"rank, k = {k}", lambda f, k=k: rank_overlap(f[None], prototypes, k)[0].float() / k)
        for k in args.k
    ]
    measures.append(("cosine", lambda f: cosine_table(f[None], prototypes)[0]))
    for name, table in measures:
        w_right, w_wrong = [], []
        for feats, pred, _, is_right, is_wrong in picked:
            w = table(feats).gather(0, pred[None])[0]
            w_right.append(w[is_right])
            w_wrong.append(w[is_wrong])
        a, b = torch.cat(w_right), torch.cat(w_wrong)
        print(
            f"| {name} | {a.mean():.3f} | {b.mean():.3f} | {(a == 0).float().mean():.3f} | {(b == 0).float().mean():.3f} |"
        )


if __name__ == "__main__":
    main()
