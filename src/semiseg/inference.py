"""Using a trained checkpoint: rebuild its model, evaluate it, predict masks for new images."""

from __future__ import annotations

import dataclasses
from collections import Counter
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
from semiseg.data.formats import DataError, Sample, colorize, get_format, require_masks
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import eval_transform
from semiseg.distributed import resolve_device
from semiseg.evaluation import SegmentationScores, evaluate, predict_logits
from semiseg.files import atomic_write
from semiseg.models import build_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


DATA_PATHS = ("root", "labeled", "unlabeled", "val", "pseudo_labeled")


def rebased(cfg: Config, workdir: str | None) -> Config:
    """`cfg` with the relative data paths of a run made absolute against the folder it was
    trained from (a checkpoint's `workdir`), where they exist there: a checkpoint then works
    from any folder. Paths that do not exist there stay as they are (relative to here)."""
    if not workdir:
        return cfg
    changes = {}
    for key in DATA_PATHS:
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and (Path(workdir) / value).exists():
            changes[key] = str(Path(workdir) / value)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def load_trained_model(
    path: str | Path, device: torch.device
) -> tuple[torch.nn.Module, Config, dict]:
    """The checkpoint's evaluation network (EMA copy when the run evaluated it), in eval mode."""
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = rebased(config_from_saved(ckpt["config"]), ckpt.get("workdir"))
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
        decoder=cfg.model.decoder,
        decoder_channels=cfg.model.decoder_channels,
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
    dev = resolve_device(device, key="--device")
    model, cfg, ckpt = load_trained_model(path, dev)
    root = Path(data_root or cfg.data.root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (pass --data-root)")
    check_class_count(cfg, root, ckpt, path)
    fmt = get_format(cfg.data.format, ckpt["num_classes"], ckpt["class_names"])
    val_path = val_list if val_list is not None else cfg.data.val
    if val_path:
        samples = read_split(resolve_list(val_path, root), root, require_mask=True)
    else:
        samples = require_masks(fmt.list_samples(root, "val"), f"{root}: the format's val subset")
    # Decoded: a mask value the checkpoint's classes do not have is an error, not a low mIoU.
    check_samples(samples, fmt, deep=True, desc="check val")
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


def check_class_count(cfg: Config, root: Path, ckpt: dict, path: str | Path) -> None:
    """Refuse data whose format says it has another number of classes than the checkpoint
    (a folder dataset's classes.txt, or a fixed-class format)."""
    data_classes = get_format(cfg.data.format, None, None, root=root).num_classes
    if data_classes is not None and data_classes != ckpt["num_classes"]:
        raise DataError(
            f"{path} predicts {ckpt['num_classes']} classes but the {cfg.data.format} data in {root} "
            f"has {data_classes}; evaluate it on data of its own classes"
        )


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
    dev = resolve_device(device, key="--device")
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
    names = mask_names(images)
    for index in tqdm(range(len(dataset)), desc="predict"):
        item = dataset[index]
        with Image.open(images[index]) as original:
            out_size = (original.height, original.width)
        logits = predict_logits(
            model, item["image"][None].to(dev), ckpt["num_classes"], out_size, mode, size
        )
        mask = logits.argmax(1)[0].to(torch.uint8).cpu().numpy().astype(np.uint8)
        atomic_write(
            output_dir / names[index],
            lambda tmp, m=mask: colorize(m, fmt.palette).save(tmp, format="PNG"),
        )
    return len(images)


def mask_names(images: Sequence[Path]) -> list[str]:
    """Output names of the predicted masks: IMAGE_STEM.png, or IMAGE_NAME.png where two
    images share a stem (a.jpg and a.png give a.jpg.png and a.png.png, never one a.png)."""
    stems = Counter(p.stem for p in images)
    return [f"{p.stem}.png" if stems[p.stem] == 1 else f"{p.name}.png" for p in images]
