"""Using a trained checkpoint: rebuild its model, evaluate it, predict masks for new images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from semiseg.checkpoint import load_checkpoint
from semiseg.config import Config, config_from_saved
from semiseg.data.dataset import SegmentationDataset, check_samples
from semiseg.data.formats import DataError, Sample, colorize, get_format
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import eval_transform
from semiseg.distributed import resolve_device
from semiseg.evaluation import SegmentationScores, evaluate, predict_logits
from semiseg.models import build_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_trained_model(
    path: str | Path, device: torch.device
) -> tuple[torch.nn.Module, Config, dict]:
    """The checkpoint's evaluation network (EMA copy when the run evaluated it), in eval mode."""
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = config_from_saved(ckpt["config"])
    # The weights come from the checkpoint, so no pretrained file is needed to rebuild it;
    # they also say whether the network has a projection head, and how wide.
    projection = [
        v
        for k, v in ckpt["eval_model"].items()
        if k.startswith("projector.") and k.endswith(".weight")
    ]
    model = build_model(
        cfg.model.name,
        cfg.model.backbone,
        ckpt["num_classes"],
        pretrained=None,
        output_stride=cfg.model.output_stride,
        projection_dim=projection[-1].shape[0] if projection else None,
    )
    model.load_state_dict(ckpt["eval_model"])
    return model.to(device).eval(), cfg, ckpt


def evaluate_checkpoint(
    path: str | Path,
    *,
    data_root: str | None = None,
    val_list: str | None = None,
    mode: str | None = None,
    size: int | None = None,
    device: str = "auto",
    tail_classes: Sequence[int] | None = None,
) -> tuple[SegmentationScores, list[str]]:
    """Whole-set mIoU of a checkpoint on its own validation data or on the given one."""
    dev = resolve_device(device)
    model, cfg, ckpt = load_trained_model(path, dev)
    root = Path(data_root or cfg.data.root)
    fmt = get_format(cfg.data.format, ckpt["num_classes"], ckpt["class_names"])
    val_path = val_list if val_list is not None else cfg.data.val
    if val_path:
        samples = read_split(resolve_list(val_path, root), root, require_mask=True)
    else:
        samples = fmt.list_samples(root, "val")
    check_samples(samples, fmt, deep=False, desc="check val")
    mode = mode or cfg.data.eval_mode
    size = size or cfg.data.eval_size or cfg.data.crop_size
    dataset = SegmentationDataset(samples, fmt, eval_transform(mode, size), with_mask=True)
    scores = evaluate(
        model,
        DataLoader(dataset, batch_size=1, num_workers=min(2, cfg.data.workers)),
        ckpt["num_classes"],
        device=dev,
        mode=mode,
        window=size,
        tail_classes=cfg.eval.tail_classes if tail_classes is None else tail_classes,
    )
    return scores, list(ckpt["class_names"])


@torch.no_grad()
def predict_folder(
    path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    mode: str | None = None,
    size: int | None = None,
    device: str = "auto",
) -> int:
    """Write one palette PNG mask (original image size) per image in `input_dir`; returns the count."""
    dev = resolve_device(device)
    model, cfg, ckpt = load_trained_model(path, dev)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise DataError(f"input folder not found: {input_dir}")
    images = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {input_dir}")
    fmt = get_format(cfg.data.format, ckpt["num_classes"], ckpt["class_names"])
    mode = mode or cfg.data.eval_mode
    size = size or cfg.data.eval_size or cfg.data.crop_size
    dataset = SegmentationDataset(
        [Sample(p, None) for p in images], fmt, eval_transform(mode, size), with_mask=False
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(len(dataset)), desc="predict"):
        item = dataset[index]
        with Image.open(images[index]) as original:
            out_size = (original.height, original.width)
        logits = predict_logits(
            model, item["image"][None].to(dev), ckpt["num_classes"], out_size, mode, size
        )
        mask = logits.argmax(1)[0].to(torch.uint8).cpu().numpy().astype(np.uint8)
        target = output_dir / f"{images[index].stem}.png"
        tmp = target.with_name(f".{target.name}.tmp")
        colorize(mask, fmt.palette).save(tmp, format="PNG")
        tmp.replace(target)
    return len(images)
