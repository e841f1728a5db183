"""`semiseg detector`: the object detector behind reliable pseudo-label pixels (RPPI).

The rank-statistics paper trains a torchvision Faster R-CNN from scratch, only on the
labeled images, on boxes made from their masks (one per 8-connected component of each
"thing" class, `semiseg.pseudo.detector.boxes_from_mask`), then keeps its detections on
the unlabeled images above a score threshold (0.85 VOC, 0.95 Cityscapes).

The detector's options are the `policy.detector` section of the rank-weighting policy
(`semiseg.pseudo.detector.DetectorOptions`); its folder is `policy.detector.dir`
(`semiseg.run_folder.DetectorFolder`), and training reads the cached boxes through
`semiseg.data.detections.DetectionCache`.

- `train_detector`: Adam (lr 5e-5, the released code), horizontal flips, checkpoints every
  `detector.checkpoint_every` steps to DIR/latest.pt (written atomically); running again
  resumes (model, optimiser, data position and RNG) and a finished run is left as it is.
- `detect`: detections on every unlabeled image to DIR/detections/NNNNNN.json (score >=
  the threshold), skipping images already done, so the set is labelled once and cached.
- `box_accuracy`: the supplement's box accuracy: a detection is correct when its IoU with
  a box from the ground-truth mask of the same class is at least 0.8.
- `pixel_box_accuracy`: the supplement's Table 1 below it: precision of a segmentation
  checkpoint's confident pseudo labels inside and outside the cached boxes of their class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from semiseg import config_legacy
from semiseg.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
    seed_everything,
)
from semiseg.config import Config, ConfigError, config_to_dict
from semiseg.data.dataset import SegmentationDataset, load_image
from semiseg.data.detections import DetectionCache
from semiseg.data.formats import DatasetFormat, Sample
from semiseg.data.sampling import ResumableSampler
from semiseg.data.transforms import eval_transform
from semiseg.evaluation import predict_logits
from semiseg.files import atomic_write_text
from semiseg.inference import load_trained_model
from semiseg.pseudo.detector import (
    DetectorOptions,
    box_agreement_counts,
    box_class_map,
    boxes_from_mask,
)
from semiseg.run_folder import DetectorFolder

BACKBONES = {
    "resnet50_fpn": tv_detection.fasterrcnn_resnet50_fpn,
    "mobilenet_v3_fpn": tv_detection.fasterrcnn_mobilenet_v3_large_fpn,
}


def detector_options(cfg: Config) -> DetectorOptions:
    """The detector section of the config's policy (`policy.detector`)."""
    det = getattr(cfg.policy, "detector", None)
    if not isinstance(det, DetectorOptions):
        policy = cfg.policy.name if cfg.policy is not None else None
        raise ConfigError(
            f"semiseg detector needs a policy with a detector (policy.name=rankweight and its policy.detector "
            f"section); this config's policy is {policy!r}"
        )
    return det


def _reliable_threshold(cfg: Config) -> float:
    return float(cfg.policy.reliable_threshold)


def build_detector(cfg: Config) -> nn.Module:
    """Faster R-CNN without any pretrained weights (the paper trains it from scratch); class
    k + 1 of the detector is `detector.classes[k]` of the segmentation (0 is background)."""
    det = detector_options(cfg)
    if not det.classes:
        raise ConfigError(
            "policy.detector.classes is empty: list the segmentation classes to detect (thing classes)"
        )
    return BACKBONES[det.backbone](
        weights=None,
        weights_backbone=None,
        num_classes=len(det.classes) + 1,
        min_size=det.min_size,
        max_size=det.max_size,
    )


def detection_target(sample: Sample, fmt: DatasetFormat, cfg: Config) -> tuple[torch.Tensor, dict]:
    """(image float [3,H,W] in [0,1], {'boxes', 'labels'}) of one labeled sample: boxes of
    the components of `detector.classes` with at least `detector.min_component_pixels` pixels."""
    assert sample.mask is not None
    image = TF.to_dtype(TF.pil_to_tensor(load_image(sample.image)), torch.float32, scale=True)
    mask = torch.from_numpy(fmt.load_mask(sample.mask).astype(np.int64))
    det = detector_options(cfg)
    boxes, labels = boxes_from_mask(mask, det.classes)
    keep = _component_sizes(mask, boxes, labels) >= det.min_component_pixels
    detector_labels = torch.tensor(
        [det.classes.index(int(c)) + 1 for c in labels[keep]], dtype=torch.int64
    )
    return image, {"boxes": boxes[keep], "labels": detector_labels}


def _component_sizes(mask: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixels of each box's class inside it (a lower bound on its component's size)."""
    sizes = [
        int((mask[int(y1) : int(y2), int(x1) : int(x2)] == c).sum())
        for (x1, y1, x2, y2), c in zip(boxes.tolist(), labels.tolist(), strict=True)
    ]
    return torch.tensor(sizes, dtype=torch.int64)


def _flip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def train_detector(
    cfg: Config,
    samples: list[Sample],
    fmt: DatasetFormat,
    device: torch.device,
    progress: bool = True,
) -> Path:
    """Train (or resume, or leave alone if finished) the detector in `detector.dir`."""
    det = detector_options(cfg)
    latest = DetectorFolder(det.dir).latest
    seed_everything(cfg.train.seed)  # before building: the initial weights depend on the seed only
    model = build_detector(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=det.lr)
    iteration = 0
    if latest.is_file():
        ckpt = load_checkpoint(latest)
        saved = (config_legacy.upgrade(ckpt["config"]).get("policy") or {}).get("detector")
        if saved != config_to_dict(cfg)["policy"]["detector"]:
            raise ConfigError(
                f"{latest} was trained with another detector config; use another policy.detector.dir"
            )
        model.load_state_dict(ckpt["models"]["detector"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iteration = ckpt["iteration"]
        restore_rng(ckpt["rng"])
    if iteration >= det.iterations:
        return latest
    sampler = iter(ResumableSampler(len(samples), cfg.train.seed, start=iteration * det.batch_size))
    model.train()
    bar = tqdm(
        total=det.iterations,
        initial=iteration,
        desc="detector",
        disable=not progress,
        dynamic_ncols=True,
    )
    while iteration < det.iterations:
        images, targets = [], []
        for _ in range(det.batch_size):
            index, aug_seed = next(sampler)
            image, target = detection_target(samples[index], fmt, cfg)
            # The sampler's per-sample seed is a hash of (seed, epoch, position): its parity is
            # a fair coin that a resumed run draws again identically.
            if aug_seed % 2:
                image, target = _flip(image, target)
            images.append(image.to(device))
            targets.append({k: v.to(device) for k, v in target.items()})
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"detector loss is {loss.item()} at step {iteration}; lower detector.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if iteration % det.checkpoint_every == 0 or iteration == det.iterations:
            ckpt = {
                "version": 1,
                "iteration": iteration,
                "config": config_to_dict(cfg),
                "num_classes": len(det.classes) + 1,
                "class_names": [],
                "models": {"detector": model.state_dict()},
                "optimizer": optimizer.state_dict(),
                "rng": capture_rng(),
            }
            save_atomic(ckpt, latest)
    bar.close()
    return latest


def load_detector(cfg: Config, device: torch.device) -> nn.Module:
    det = detector_options(cfg)
    path = DetectorFolder(det.dir).latest
    ckpt = load_checkpoint(path)
    if ckpt["iteration"] < det.iterations:
        raise ConfigError(
            f"{path} is at iteration {ckpt['iteration']} of {det.iterations}: finish training first"
        )
    model = build_detector(cfg)
    model.load_state_dict(ckpt["models"]["detector"])
    return model.to(device).eval()


def detection_cache(cfg: Config) -> DetectionCache:
    det = detector_options(cfg)
    return DetectionCache(det.dir, det.classes)


@torch.no_grad()
def detect(cfg: Config, samples: list[Sample], device: torch.device, progress: bool = True) -> Path:
    """Cache the detections (score >= detector.score_threshold) of every sample; returns the folder."""
    model = load_detector(cfg, device)
    det = detector_options(cfg)
    classes, folder = det.classes, DetectorFolder(det.dir)
    todo = [i for i in range(len(samples)) if not folder.detection_file(i).is_file()]
    for i in tqdm(todo, desc="detect", disable=not progress, dynamic_ncols=True):
        image = TF.to_dtype(
            TF.pil_to_tensor(load_image(samples[i].image)), torch.float32, scale=True
        )
        found = model([image.to(device)])[0]
        keep = found["scores"] >= det.score_threshold
        record = {
            "image": str(samples[i].image),
            "boxes": found["boxes"][keep].cpu().tolist(),
            "classes": [classes[int(k) - 1] for k in found["labels"][keep].cpu()],
            "scores": found["scores"][keep].cpu().tolist(),
        }
        atomic_write_text(folder.detection_file(i), json.dumps(record) + "\n")
    return folder.detections


def box_accuracy(cfg: Config, samples: list[Sample], fmt: DatasetFormat, iou: float = 0.8) -> dict:
    """Share of cached detections that match (IoU >= `iou`, same class) a box from the
    sample's ground-truth mask, overall and per class (supplement Table 1)."""
    det, cache = detector_options(cfg), detection_cache(cfg)
    correct = {c: 0 for c in det.classes}
    total = {c: 0 for c in det.classes}
    for i, sample in enumerate(samples):
        if sample.mask is None:
            raise ConfigError(f"box accuracy needs ground-truth masks; {sample.image} has none")
        boxes, classes = cache.load(i)
        mask = torch.from_numpy(fmt.load_mask(sample.mask).astype(np.int64))
        gt_boxes, gt_classes = boxes_from_mask(mask, det.classes)
        for box, c in zip(boxes, classes.tolist(), strict=True):
            total[c] += 1
            same = gt_boxes[gt_classes == c]
            if same.numel() and float(box_iou(box[None], same).max()) >= iou:
                correct[c] += 1
    detections = sum(total.values())
    return {
        "detections": detections,
        "accuracy": sum(correct.values()) / detections if detections else float("nan"),
        "per_class": {c: (correct[c] / total[c] if total[c] else None) for c in det.classes},
        "per_class_count": total,
    }


PIXEL_GROUPS = ("Pixel", "Pixel ∩ BBox", "Pixel \\ BBox")


@torch.no_grad()
def pixel_box_accuracy(
    cfg: Config,
    checkpoint: str | Path,
    samples: list[Sample],
    fmt: DatasetFormat,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Supplement Table 1 on the unlabeled set: precision of the pseudo labels of segmentation
    `checkpoint` (whole image, its config's eval mode) with confidence >= policy.reliable_threshold
    ("Pixel"), split into those inside a cached detection box of their class ("Pixel ∩ BBox",
    the pixels RPPI trusts) and the rest ("Pixel \\ BBox"), per detector class and pooled.
    """
    model, model_cfg, ckpt = load_trained_model(checkpoint, device)
    num_classes = ckpt["num_classes"]
    mode = model_cfg.data.eval_mode
    size = model_cfg.data.eval_size or model_cfg.data.crop_size
    dataset = SegmentationDataset(samples, fmt, eval_transform(mode, size), with_mask=True)
    counts = torch.zeros((len(PIXEL_GROUPS), 2, num_classes), dtype=torch.int64)
    cache, threshold = detection_cache(cfg), _reliable_threshold(cfg)
    for i in tqdm(
        range(len(samples)), desc="pixel/box accuracy", disable=not progress, dynamic_ncols=True
    ):
        item = dataset[i]
        target = item["mask"]
        logits = predict_logits(
            model, item["image"][None].to(device), num_classes, tuple(target.shape), mode, size
        )
        conf, pred = logits.float().softmax(dim=1)[0].max(dim=0)
        boxes, classes = cache.load(i)
        boxes_map = box_class_map(boxes, classes, num_classes, tuple(target.shape))
        counts += box_agreement_counts(
            pred[None].cpu(), conf[None].cpu(), target[None].long(), boxes_map[None], threshold
        )
    things = list(cache.classes)

    def precision(right: torch.Tensor, total: torch.Tensor) -> float | None:
        return float(right) / float(total) if int(total) else None

    return {
        "threshold": threshold,
        "groups": {
            name: {
                "per_class": {c: precision(counts[g, 0, c], counts[g, 1, c]) for c in things},
                "per_class_pixels": {c: int(counts[g, 1, c]) for c in things},
                "things": precision(counts[g, 0, things].sum(), counts[g, 1, things].sum()),
                "things_pixels": int(counts[g, 1, things].sum()),
            }
            for g, name in enumerate(PIXEL_GROUPS)
        },
    }
