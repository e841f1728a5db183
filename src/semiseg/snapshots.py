"""Per-image diagnostics saved at each evaluation, for figures that need maps, not scalars.

FPL's K-value maps (the paper's Fig. 5): at every evaluation of a run with `loss.name: fpl`,
the evaluated network predicts the first few unlabeled images (validation preprocessing,
no augmentation) and the size K of each pixel's fuzzy positive set is stored with the image
in RUN/fpl_kmaps/iter_NNNNNN.npz; `semiseg plot RUN` draws them side by side.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg.config import Config
from semiseg.data.dataset import SegmentationDataset
from semiseg.data.formats import DatasetFormat, Sample
from semiseg.data.transforms import denormalize, eval_transform
from semiseg.files import atomic_write
from semiseg.pseudo.fpl import fuzzy_positive_mask, k_values

KMAP_DIR = "fpl_kmaps"
KMAP_IMAGES = 4
"""Unlabeled images whose K maps are kept at each evaluation."""


@torch.no_grad()
def save_fpl_k_maps(
    model: nn.Module,
    samples: list[Sample],
    fmt: DatasetFormat,
    cfg: Config,
    iteration: int,
    device: torch.device,
) -> Path:
    """Write {'images': uint8 [N,h,w,3], 'k': uint8 [N,h,w], 'iteration'} for the first
    `KMAP_IMAGES` of `samples` to RUN/fpl_kmaps/iter_NNNNNN.npz (atomically)."""
    transform = eval_transform("resize", cfg.data.eval_size or cfg.data.crop_size)
    dataset = SegmentationDataset(samples[:KMAP_IMAGES], fmt, transform, with_mask=False)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(device)
    was_training = model.training
    model.eval()
    probs = model(images).logits.float().softmax(dim=1)
    model.train(was_training)
    k = k_values(fuzzy_positive_mask(probs, cfg.loss.T, cfg.loss.variant))
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        images=denormalize(images.cpu()).permute(0, 2, 3, 1).numpy(),
        k=k.clamp(max=255).to(torch.uint8).cpu().numpy(),
        iteration=np.int64(iteration),
    )
    path = Path(cfg.output_dir) / KMAP_DIR / f"iter_{iteration:06d}.npz"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return path


def load_k_maps(run: Path) -> list[dict]:
    """Every saved snapshot of a run, in iteration order: {'iteration', 'images', 'k'}."""
    out = []
    for path in sorted((run / KMAP_DIR).glob("iter_*.npz")):
        with np.load(path) as data:
            out.append(
                {"iteration": int(data["iteration"]), "images": data["images"], "k": data["k"]}
            )
    return out
