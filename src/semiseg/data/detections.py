"""Cached detector boxes of the unlabeled images, as the data layer reads them.

`semiseg detector detect` (`semiseg.offline.detector_training`) writes one JSON file per
unlabeled image (`semiseg.run_folder.DetectorFolder`): its boxes (xyxy, image pixels) and
their segmentation classes. A policy that reads them (RPPI) gets, per image, an int64
bitmask [H,W] whose bit i is set inside the boxes of the i-th detector class; it travels
through the augmentation with the image (`UnlabeledTransform`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from semiseg.data.formats import DataError
from semiseg.pseudo.detector import box_class_map
from semiseg.run_folder import DetectorFolder


class DetectionCache:
    """The cached detections of one unlabeled list in a detector folder (`policy.detector.dir`),
    with the detector's classes in bit order."""

    def __init__(self, detector_dir: str | Path, classes: list[int]):
        self.detector = DetectorFolder(detector_dir)
        self.folder = self.detector.detections
        self.classes = list(classes)

    def path(self, index: int) -> Path:
        return self.detector.detection_file(index)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [N,4] xyxy, segmentation classes [N]) cached for unlabeled image `index`."""
        path = self.path(index)
        if not path.is_file():
            raise DataError(
                f"no cached detections for unlabeled image {index} ({path}); run `semiseg detector detect`"
            )
        record = json.loads(path.read_text())
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        return boxes, torch.tensor(record["classes"], dtype=torch.int64)

    def bitmask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """int64 [H,W] for unlabeled image `index`: bit i is set inside the cached boxes of
        class `classes[i]`."""
        boxes, classes = self.load(index)
        inside = box_class_map(boxes, classes, max(self.classes) + 1, size)
        bits = torch.zeros(size, dtype=torch.int64)
        for bit, c in enumerate(self.classes):
            bits |= inside[c].long() << bit
        return bits

    def check(self, count: int) -> None:
        """Fail before training when the detections of some of `count` images are not cached."""
        missing = [i for i in range(count) if not self.path(i).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {count} unlabeled images have no cached detections in {self.folder} "
                f"(first: index {missing[0]}); run `semiseg detector train` and `semiseg detector detect` with this config"
            )
