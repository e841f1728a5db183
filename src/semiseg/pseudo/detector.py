"""Boxes for the reliable-pixel detector (RPPI): from segmentation masks to detection targets,
and from detections to the pixels a detector and the segmentation teacher agree on.

The paper trains a Faster R-CNN only on the labeled images, on boxes derived from their
masks (supplement Sec. 1): per listed ("thing") class, one box per connected set of its
pixels; background and stuff classes (sky, road, building, ...) get none, since their boxes
would cover most of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from semiseg.labels import IGNORE_INDEX
from semiseg.options import Options

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class DetectorOptions(Options):
    """The object detector of reliable pseudo-label pixels (`semiseg detector`; the
    `policy.detector` section of the rank-weighting policy with RPPI)."""

    classes: list[int] = field(default_factory=list)
    """Segmentation classes the detector learns ("thing" classes; stuff classes get no boxes)."""
    backbone: Literal["resnet50_fpn", "mobilenet_v3_fpn"] = "resnet50_fpn"
    """torchvision Faster R-CNN backbone, trained from scratch (the paper: ResNet-50 FPN)."""
    dir: str = "runs/detector"
    """Folder of the detector's checkpoint and cached detections."""
    iterations: int = 2000
    batch_size: int = 4
    lr: float = 5e-5
    """Adam learning rate (the released code)."""
    min_size: int = 800
    max_size: int = 1333
    """torchvision's resizing of detector inputs (shorter side, longer side cap)."""
    score_threshold: float = 0.85
    """Detections kept on unlabeled images (the paper: 0.85 VOC, 0.95 Cityscapes)."""
    min_component_pixels: int = 0
    """Components with fewer pixels of their class get no training box (the released code: 91)."""
    checkpoint_every: int = 200

    def validate(self) -> None:
        super().validate()
        self.positive("iterations", "batch_size", "lr", "min_size", "max_size", "checkpoint_every")
        self.probability("score_threshold")
        self.require(
            len(set(self.classes)) == len(self.classes), "classes", "must not repeat a class"
        )
        self.require(
            all(0 <= c < IGNORE_INDEX for c in self.classes),
            "classes",
            f"must be class indices below {IGNORE_INDEX}",
        )


def boxes_from_mask(mask: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One box per 8-connected component of each listed class of `mask` [H,W].

    Returns (boxes [N,4] float32 as x1, y1, x2, y2 with x2, y2 exclusive, labels [N] int64),
    ordered by class (in `classes` order) and then by the component's first pixel in
    row-major order. Classes not listed (and ignore pixels, 255) get no boxes.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H,W], got shape {tuple(mask.shape)}")
    labels_np = mask.cpu().numpy()
    boxes, labels = [], []
    for c in classes:
        components, count = ndimage.label(labels_np == c, structure=EIGHT_CONNECTED)
        if count == 0:
            continue
        for sl in ndimage.find_objects(components):
            rows, cols = sl
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            labels.append(c)
    if not boxes:
        return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def box_class_map(boxes: Tensor, labels: Tensor, num_classes: int, size: tuple[int, int]) -> Tensor:
    """bool [C,H,W]: True where a pixel lies inside some box of class c (x2, y2 exclusive)."""
    inside = torch.zeros((num_classes, *size), dtype=torch.bool)
    height, width = size
    for (x1, y1, x2, y2), c in zip(boxes.round().long().tolist(), labels.tolist(), strict=True):
        inside[c, max(0, y1) : min(height, y2), max(0, x1) : min(width, x2)] = True
    return inside


def _in_predicted_box(pred: Tensor, boxes_map: Tensor) -> Tensor:
    """bool [B,H,W]: the pixel lies inside a detected box of its predicted class."""
    return boxes_map.gather(1, pred.long().clamp(max=boxes_map.shape[1] - 1).unsqueeze(1)).squeeze(
        1
    )


def reliable_pixels(pred: Tensor, conf: Tensor, boxes_map: Tensor, threshold: float) -> Tensor:
    """RPPI (Sec. 3.3): pixels inside a detected box of their predicted class c whose
    teacher confidence reaches `threshold`. pred/conf [B,H,W], boxes_map [B,C,H,W] bool;
    returns bool [B,H,W]."""
    return _in_predicted_box(pred, boxes_map) & (conf >= threshold)


def box_agreement_counts(
    pred: Tensor, conf: Tensor, target: Tensor, boxes_map: Tensor, threshold: float
) -> Tensor:
    """Pseudo-label precision counts of the three pixel groups of the supplement's Table 1.

    Pixel: confidence >= `threshold`; Pixel ∩ BBox: those inside a detected box of their
    predicted class; Pixel \\ BBox: the rest of Pixel. pred/conf/target [B,H,W] (target 255 =
    unknown, left out), boxes_map [B,C,H,W] bool with C the number of segmentation classes.

    Returns int64 [3, 2, C]: for each group (in that order), per predicted class c, the number
    of its pixels labeled c that are right (row 0) and of all its pixels labeled c (row 1).
    """
    num_classes = boxes_map.shape[1]
    pred = pred.long()
    pixel = (conf >= threshold) & (target != IGNORE_INDEX)
    in_box = _in_predicted_box(pred, boxes_map)
    right = pred == target
    counts = torch.zeros((3, 2, num_classes), dtype=torch.int64)
    for g, group in enumerate((pixel, pixel & in_box, pixel & ~in_box)):
        counts[g, 0] = torch.bincount(pred[group & right], minlength=num_classes)[:num_classes]
        counts[g, 1] = torch.bincount(pred[group], minlength=num_classes)[:num_classes]
    return counts
