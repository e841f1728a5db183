"""Random training batches shaped like the data pipeline's, for the step-timing scripts."""

from __future__ import annotations

import torch


def make_batches(
    batch: int, crop: int, num_classes: int, generator: torch.Generator, detection_bits: int = 0
) -> tuple[dict, dict, dict]:
    """A labeled batch, an unlabeled batch and its CutMix source. With `detection_bits`, every
    unlabeled pixel lies inside a box of every detector class (the rank-weighting policy's
    most expensive case)."""

    def unlabeled() -> dict:
        box = torch.zeros(batch, crop, crop, dtype=torch.bool)
        box[:, : crop // 2, : crop // 2] = True
        out = {
            "image": torch.randn(batch, 3, crop, crop, generator=generator),
            "strong1": torch.randn(batch, 3, crop, crop, generator=generator),
            "strong2": torch.randn(batch, 3, crop, crop, generator=generator),
            "box1": box,
            "box2": box,
            "valid": torch.ones(batch, crop, crop, dtype=torch.bool),
        }
        if detection_bits:
            out["detections"] = torch.full(
                (batch, crop, crop), 2**detection_bits - 1, dtype=torch.int64
            )
        return out

    labeled = {
        "image": torch.randn(batch, 3, crop, crop, generator=generator),
        "mask": torch.randint(0, num_classes, (batch, crop, crop), generator=generator),
    }
    return labeled, unlabeled(), unlabeled()
