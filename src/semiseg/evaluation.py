"""Segmentation metrics from an accumulated confusion matrix, and inference helpers.

mIoU follows the field's convention: one confusion matrix accumulated over the whole
validation set (not a mean of per-image IoUs), ignore index excluded, IoU_c =
TP_c / (TP_c + FP_c + FN_c), averaged over classes. A class that never appears in
the ground truth nor in the predictions has no defined IoU and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Count matrix m[t, p] = #pixels with ground truth t and prediction p.

    pred, target: integer tensors of equal shape (any, e.g. [B,H,W]). Pixels whose
    target is `ignore_index` are skipped. Returns int64 [C, C].
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
        )
    valid = target != ignore_index
    target = target[valid].long()
    pred = pred[valid].long()
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(f"target has labels outside [0, {num_classes}) other than {ignore_index}")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


@dataclass
class SegmentationScores:
    """IoU summary of one confusion matrix."""

    iou: list[float | None]
    """Per-class IoU; None where the class is absent from both ground truth and prediction."""
    miou: float
    pixel_accuracy: float
    tail_miou: float | None
    confusion: Tensor

    def as_dict(self, class_names: Sequence[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.iou))]
        out = {"miou": self.miou, "pixel_accuracy": self.pixel_accuracy}
        if self.tail_miou is not None:
            out["tail_miou"] = self.tail_miou
        out.update(
            {
                f"iou/{name}": value
                for name, value in zip(names, self.iou, strict=True)
                if value is not None
            }
        )
        return out


def scores_from_confusion(
    confusion: Tensor, tail_classes: Sequence[int] = ()
) -> SegmentationScores:
    """IoU per class, mIoU, pixel accuracy and the mean IoU over `tail_classes` (all in [0, 1])."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    defined = union > 0
    iou_t = torch.where(defined, tp / union.clamp(min=1), torch.zeros_like(tp))
    iou: list[float | None] = [float(v) if d else None for v, d in zip(iou_t, defined, strict=True)]
    miou = float(iou_t[defined].mean()) if defined.any() else 0.0
    total = confusion.sum()
    accuracy = float(tp.sum() / total) if total > 0 else 0.0
    tail = None
    if tail_classes:
        bad = [c for c in tail_classes if not 0 <= c < len(iou)]
        if bad:
            raise ValueError(f"tail class indices {bad} outside [0, {len(iou)})")
        tail_values = [iou[c] for c in tail_classes if iou[c] is not None]
        tail = sum(tail_values) / len(tail_values) if tail_values else 0.0
    return SegmentationScores(iou, miou, accuracy, tail, confusion.long())


def format_scores(scores: SegmentationScores, class_names: Sequence[str] | None = None) -> str:
    """A fixed-width per-class IoU table (percent) for terminals and logs."""
    names = list(class_names or [str(i) for i in range(len(scores.iou))])
    width = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'class':<{width}}{'IoU (%)':>9}", "-" * (width + 9)]
    for name, value in zip(names, scores.iou, strict=True):
        lines.append(f"{name:<{width}}{'n/a' if value is None else f'{100 * value:.2f}':>9}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}{100 * scores.miou:>9.2f}")
    if scores.tail_miou is not None:
        lines.append(f"{'tail mIoU':<{width}}{100 * scores.tail_miou:>9.2f}")
    lines.append(f"{'pixel acc':<{width}}{100 * scores.pixel_accuracy:>9.2f}")
    return "\n".join(lines)


def format_score_dict(scores: dict) -> str:
    """`format_scores` of the scores a run saved (`SegmentationScores.as_dict`, final.json)."""
    ious = {
        key.removeprefix("iou/"): value for key, value in scores.items() if key.startswith("iou/")
    }
    width = max(12, max((len(n) for n in ious), default=0) + 2)
    lines = [f"{'class':<{width}}{'IoU (%)':>9}", "-" * (width + 9)]
    lines += [f"{name:<{width}}{100 * value:>9.2f}" for name, value in ious.items()]
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}{100 * scores['miou']:>9.2f}")
    if scores.get("tail_miou") is not None:
        lines.append(f"{'tail mIoU':<{width}}{100 * scores['tail_miou']:>9.2f}")
    lines.append(f"{'pixel acc':<{width}}{100 * scores['pixel_accuracy']:>9.2f}")
    return "\n".join(lines)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): a regular grid plus one window flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def sliding_window_logits(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    window: int,
    stride: int | None = None,
) -> Tensor:
    """Average the logits of overlapping `window` x `window` crops (default stride 2/3 of the window).

    image: [B,3,H,W]; `predict` maps [B,3,h,w] -> logits [B,C,h,w]. Images smaller than
    the window are zero-padded (the padded logits are discarded). Returns [B,C,H,W].
    """
    stride = stride or max(1, (2 * window) // 3)
    b, _, h, w = image.shape
    pad_h, pad_w = max(0, window - h), max(0, window - w)
    padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
    ph, pw = padded.shape[-2:]
    total = image.new_zeros((b, num_classes, ph, pw))
    count = image.new_zeros((1, 1, ph, pw))
    for top in window_starts(ph, window, stride):
        for left in window_starts(pw, window, stride):
            crop = padded[:, :, top : top + window, left : left + window]
            total[:, :, top : top + window, left : left + window] += predict(crop).float()
            count[:, :, top : top + window, left : left + window] += 1
    return (total / count)[:, :, :h, :w]


def predict_logits(
    model: torch.nn.Module,
    image: Tensor,
    num_classes: int,
    out_size: tuple[int, int],
    mode: str = "none",
    window: int | None = None,
) -> Tensor:
    """Logits [B,C,*out_size] for a normalised image batch, with optional sliding windows.

    `model(x)` must return an object with a `logits` attribute at the input resolution.
    """

    def run(x: Tensor) -> Tensor:
        return model(x).logits

    if mode == "sliding":
        if window is None:
            raise ValueError("sliding-window evaluation needs a window size")
        logits = sliding_window_logits(run, image, num_classes, window)
    else:
        logits = run(image)
    if tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    num_classes: int,
    *,
    device: torch.device,
    mode: str = "none",
    window: int | None = None,
    ignore_index: int = 255,
    tail_classes: Sequence[int] = (),
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> SegmentationScores:
    """Accumulate the confusion matrix of `model` over `batches` (dicts with image [B,3,h,w], mask [B,H,W]).

    Under torch.distributed each process evaluates its own shard and the matrices are summed,
    so the result is the whole-set mIoU on every rank.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in tqdm(batches, desc="eval", leave=False, disable=not progress):
        image = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = predict_logits(model, image, num_classes, tuple(mask.shape[-2:]), mode, window)
        confusion += confusion_matrix(logits.argmax(1), mask, num_classes, ignore_index)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
    model.train(was_training)
    return scores_from_confusion(confusion.cpu(), tail_classes)
