"""`semiseg pseudo-label`: offline pseudo labels for a whole unlabeled set, in bounded memory.

Four passes over the set, each resumable, each holding one image at a time:

1. predict: the teacher labels every image (logits averaged over a horizontal flip, divided
   by the temperature, softmax); its class and confidence (float16) go to OUT/cache/;
2. histogram: per-class counts of the float16 confidences (`ConfidenceHistogram`) give the
   generator's thresholds exactly, as sorting the whole set would;
3. allot (DARS): how many of each over-full class's kept pixels every image keeps, drawn
   so that class j ends with exactly n_j pixels, a uniformly random subset of its candidates;
4. write: OUT/labels/NNNNNN_NAME.png (class indices, 255 = ignored), written atomically,
   OUT/list.txt (a split list of image and pseudo mask, for `data.pseudo_labeled`), and
   OUT/stats.json (targets, thresholds, class counts before/after sampling, KL divergence
   to the labeled distribution). stats.json is written last: its presence means done.

A killed run starts again where it stopped: cached predictions and written labels are
kept, and thresholds, allotments and random choices are functions of (seed, image index),
so the labels are the same as in an uninterrupted run. Under torchrun every process
predicts and writes its share of the images.

The thresholds, the allotment and the per-image sampling are `semiseg.pseudo.dars`'s, the
same code as the in-memory `dars_labels`; this module adds the teacher, the files and the
passes (folder layout: `semiseg.run_folder.PseudoLabelFolder`).

Memory: the largest objects are one image's logits (C x H x W float32) and the histograms
(C x 15,361 int64); nothing grows with the number of images. Precision: thresholds are
exact on float16-rounded confidences (relative precision 2^-11, as the official DARS code
stores them).
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from semiseg.data.dataset import SegmentationDataset
from semiseg.data.formats import DatasetFormat, Sample, get_format
from semiseg.data.splits import read_split, resolve_list, write_split
from semiseg.data.transforms import eval_transform
from semiseg.distributed import DistContext, barrier, cleanup, init_distributed
from semiseg.evaluation import predict_logits
from semiseg.files import atomic_write, atomic_write_text, remove_stale_temporaries
from semiseg.inference import load_trained_model
from semiseg.labels import IGNORE_INDEX
from semiseg.options import ConfigError
from semiseg.pseudo.dars import (
    ConfidenceHistogram,
    GeneratorSpec,
    Plan,
    allot,
    candidates,
    class_ratio,
    kl_divergence,
    plan_thresholds,
    subsample,
    thresholded,
)
from semiseg.run_folder import PseudoLabelFolder

__all__ = ["GeneratorSpec", "TeacherSpec", "format_stats", "generate", "pseudo_label_checkpoint"]


@dataclass
class TeacherSpec:
    """How the teacher predicts: `mode`/`size` as `data.eval_mode`/`eval_size`, plus a flip;
    `base_size`: the image's longer side is first resized to it (the released DARS
    generators' base_size), and the logits back to the image's size."""

    mode: str = "none"
    size: int | None = None
    flip: bool = True
    base_size: int | None = None


def labeled_class_counts(
    samples: list[Sample], fmt: DatasetFormat, num_classes: int, progress: bool = True
) -> torch.Tensor:
    """Pixels per class over the labeled masks (255 excluded), int64 [C], one mask at a time."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for sample in tqdm(
        samples, desc="labeled class counts", disable=not progress, dynamic_ncols=True
    ):
        assert sample.mask is not None
        labels = torch.from_numpy(fmt.load_mask(sample.mask).astype(np.int64)).flatten()
        labels = labels[labels != IGNORE_INDEX]
        counts += torch.bincount(labels, minlength=num_classes)[:num_classes]
    return counts


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def _load_cache(out: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(PseudoLabelFolder(out).cache_file(index)) as data:
        return torch.from_numpy(data["conf"]), torch.from_numpy(data["pred"])


@torch.no_grad()
def predict_set(
    model: torch.nn.Module,
    samples: list[Sample],
    fmt: DatasetFormat,
    num_classes: int,
    out: Path,
    spec: GeneratorSpec,
    teacher: TeacherSpec,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: bool = True,
    clock: AttemptClock | None = None,
) -> None:
    """Pass 1: cache the teacher's class (uint8) and confidence (float16) for this process's
    share of `samples`, skipping images already cached."""
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    transform = eval_transform(teacher.mode, teacher.size)
    dataset = SegmentationDataset(samples, fmt, transform, with_mask=False)
    folder = PseudoLabelFolder(out)
    todo = [i for i in range(rank, len(samples), world) if not folder.cache_file(i).is_file()]
    model.eval()
    for i in tqdm(todo, desc="teacher predictions", disable=not progress, dynamic_ncols=True):
        with Image.open(samples[i].image) as img:
            width, height = img.size
        image = dataset[i]["image"].unsqueeze(0).to(device)
        if teacher.base_size:
            scale = teacher.base_size / max(image.shape[-2:])
            resized = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
            image = F.interpolate(image, size=resized, mode="bilinear", align_corners=False)
        logits = predict_logits(
            model, image, num_classes, (height, width), teacher.mode, teacher.size
        )
        if teacher.flip:
            flipped = predict_logits(
                model, image.flip(-1), num_classes, (height, width), teacher.mode, teacher.size
            )
            logits = (logits + flipped.flip(-1)) / 2
        logits = logits.float() / spec.temperature
        if spec.variant == "official":
            logits = logits.half()
        conf, pred = logits.softmax(dim=1)[0].max(dim=0)
        _save_npz(
            folder.cache_file(i),
            conf=conf.half().cpu().numpy(),
            pred=pred.to(torch.uint8).cpu().numpy(),
        )
        if clock is not None:
            clock.tick()


class AttemptClock:
    """Seconds a generation took over all its attempts: the time of an attempt that a kill
    stopped is kept in OUT/timing.json (updated after every image), so stats.json's
    `seconds` is the whole cost, not the last attempt's."""

    def __init__(self, path: Path):
        self.path = path
        self.before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def tick(self) -> None:
        atomic_write_text(self.path, json.dumps({"seconds": self.seconds()}) + "\n")


def histogram(out: Path, count: int, num_classes: int) -> ConfidenceHistogram:
    """Pass 2: per-class confidence histogram of every cached image."""
    hist = ConfidenceHistogram(num_classes)
    for i in range(count):
        conf, pred = _load_cache(out, i)
        hist.add(conf.float(), pred)
    return hist


def allot_set(out: Path, count: int, spec: GeneratorSpec, plan: Plan, seed: int) -> np.ndarray:
    """Pass 3 (DARS): kept pixels of each class per image, int64 [N, C] (`allot` on the
    candidates of every cached image; the random draws are a function of `seed`)."""
    thresholds = plan.threshold_tensor()
    num_classes = len(plan.thresholds)
    per_image = np.zeros((count, num_classes), dtype=np.int64)
    for i in range(count):
        conf, pred = _load_cache(out, i)
        keep = candidates(conf, pred, thresholds)
        per_image[i] = np.bincount(pred[keep].long().numpy(), minlength=num_classes)[:num_classes]
    return allot(per_image, plan, spec.variant, np.random.default_rng(seed))


def write_labels(
    out: Path,
    samples: list[Sample],
    plan: Plan,
    allotment: np.ndarray | None,
    seed: int,
    ctx: DistContext | None = None,
    progress: bool = True,
    clock: AttemptClock | None = None,
) -> None:
    """Pass 4: this process's share of label PNGs, skipping those already written."""
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    folder = PseudoLabelFolder(out)
    todo = [
        i
        for i in range(rank, len(samples), world)
        if not folder.label_file(i, samples[i].image).is_file()
    ]
    for i in tqdm(todo, desc="write pseudo labels", disable=not progress, dynamic_ncols=True):
        conf, pred = _load_cache(out, i)
        labels = thresholded(conf, pred, plan)
        if allotment is not None:
            # Per-image generators: a resumed pass draws each image's choice again identically.
            labels = subsample(
                labels, allotment[i], torch.Generator().manual_seed(seed * 1_000_003 + i)
            )
        image = Image.fromarray(labels.to(torch.uint8).numpy(), mode="L")
        atomic_write(
            folder.label_file(i, samples[i].image), lambda tmp, im=image: im.save(tmp, format="PNG")
        )
        if clock is not None:
            clock.tick()


def final_counts(out: Path, samples: list[Sample], num_classes: int) -> torch.Tensor:
    counts = torch.zeros(num_classes, dtype=torch.int64)
    folder = PseudoLabelFolder(out)
    for i, sample in enumerate(samples):
        with Image.open(folder.label_file(i, sample.image)) as img:
            labels = torch.from_numpy(np.array(img).astype(np.int64)).flatten()
        counts += torch.bincount(labels[labels != IGNORE_INDEX], minlength=num_classes)[
            :num_classes
        ]
    return counts


def generate(
    model: torch.nn.Module,
    samples: list[Sample],
    fmt: DatasetFormat,
    num_classes: int,
    out: str | Path,
    spec: GeneratorSpec,
    *,
    labeled_counts: torch.Tensor | None = None,
    teacher: TeacherSpec | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    ctx: DistContext | None = None,
    root: Path | None = None,
    progress: bool = True,
    restart: bool = False,
    keep_cache: bool = False,
) -> dict:
    """Pseudo labels for `samples` into `out` (see the module docstring); returns the stats.

    `labeled_counts` [C] (pixels per class of the labeled set) is needed by DA and DARS and
    gives the KL divergences in the stats. `root` is the dataset folder that list.txt paths
    are written relative to. `restart` discards what an earlier generation left in `out`
    (a new teacher's labels must not reuse the old teacher's cache). The prediction cache is
    removed once the labels are written, unless `keep_cache`; so are the temporary files of
    writes a kill interrupted. stats.json's `seconds` add up every attempt's time.
    """
    out = Path(out)
    folder = PseudoLabelFolder(out)
    done = folder.stats
    is_main = ctx is None or ctx.is_main
    if is_main:
        if restart:
            folder.clear()
        remove_stale_temporaries(folder.path)
    if ctx is not None:
        barrier(ctx)
    if done.is_file():
        return json.loads(done.read_text())
    clock = AttemptClock(folder.timing) if is_main else None
    device = device or torch.device("cpu")
    teacher = teacher or TeacherSpec()
    predict_set(
        model,
        samples,
        fmt,
        num_classes,
        out,
        spec,
        teacher,
        device,
        ctx,
        progress and is_main,
        clock,
    )
    if ctx is not None:
        barrier(ctx)
    ratio = class_ratio(labeled_counts) if labeled_counts is not None else None
    hist = histogram(out, len(samples), num_classes)
    plan = plan_thresholds(spec, hist, ratio)
    allotment = allot_set(out, len(samples), spec, plan, seed) if spec.method == "dars" else None
    write_labels(out, samples, plan, allotment, seed, ctx, progress and is_main, clock)
    if ctx is not None:
        barrier(ctx)
    if is_main:
        counts = final_counts(out, samples, num_classes)
        stats = {
            "generator": asdict(spec),
            "teacher": asdict(teacher),
            "seed": seed,
            "images": len(samples),
            **_count_stats(hist, plan, ratio, counts),
            "seconds": clock.seconds() if clock is not None else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        labeled = [Sample(s.image, folder.label_file(i, s.image)) for i, s in enumerate(samples)]
        write_split(folder.split_list, labeled, root or Path("/"))
        atomic_write_text(done, json.dumps(stats, indent=2) + "\n")
        if not keep_cache:
            shutil.rmtree(folder.cache, ignore_errors=True)
        folder.timing.unlink(missing_ok=True)
        remove_stale_temporaries(folder.path)
    if ctx is not None:
        # Every process returns only once list.txt and stats.json exist.
        barrier(ctx)
    return json.loads(done.read_text())


def _count_stats(
    hist: ConfidenceHistogram, plan: Plan, ratio: torch.Tensor | None, counts: torch.Tensor
) -> dict:
    """Class counts at each stage and their KL divergence to the labeled distribution."""
    pixels = int(hist.counts.sum())
    return {
        "pixels": pixels,
        "labeled_ratio": ratio.tolist() if ratio is not None else None,
        "targets": plan.targets,
        "thresholds": plan.thresholds,
        "predicted": hist.class_totals().tolist(),
        "thresholded": plan.kept,
        "final": counts.tolist(),
        "labeled_fraction": float(counts.sum()) / max(pixels, 1),
        "kl_thresholded": kl_divergence(ratio, torch.tensor(plan.kept))
        if ratio is not None
        else None,
        "kl_final": kl_divergence(ratio, counts) if ratio is not None else None,
    }


def pseudo_label_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    spec: GeneratorSpec,
    *,
    data_root: str | None = None,
    unlabeled: str | None = None,
    labeled: str | None = None,
    flip: bool = True,
    seed: int = 0,
    device: str = "auto",
    device_key: str = "--device",
    progress: bool = True,
    restart: bool = False,
    keep_cache: bool = False,
    base_size: int | None = None,
) -> tuple[dict, list[str]]:
    """`semiseg pseudo-label`: label a checkpoint's unlabeled set (or `unlabeled`) into `out`,
    with the class distribution of its labeled set (or `labeled`); returns (stats, class names).
    `device_key` names where `device` came from (for the error when it cannot be used)."""
    ctx = init_distributed(device, device_key)
    try:
        model, cfg, ckpt = load_trained_model(checkpoint, ctx.device)
        num_classes = ckpt["num_classes"]
        root = Path(data_root or cfg.data.root)
        fmt = get_format(cfg.data.format, num_classes, ckpt["class_names"], root=root)
        unlabeled_list = unlabeled or cfg.data.unlabeled
        if not unlabeled_list:
            raise ConfigError(
                f"{checkpoint}: its config has no data.unlabeled; pass --unlabeled LIST"
            )
        samples = read_split(resolve_list(unlabeled_list, root), root, require_mask=False)
        counts = None
        if spec.method in ("da", "dars") or labeled or cfg.data.labeled:
            labeled_samples = read_split(
                resolve_list(labeled or cfg.data.labeled, root), root, require_mask=True
            )
            counts = labeled_class_counts(
                labeled_samples, fmt, num_classes, progress and ctx.is_main
            )
        size = cfg.data.eval_size or cfg.data.crop_size
        teacher = TeacherSpec(
            cfg.data.eval_mode, None if cfg.data.eval_mode == "none" else size, flip, base_size
        )
        stats = generate(
            model,
            samples,
            fmt,
            num_classes,
            out,
            spec,
            labeled_counts=counts,
            teacher=teacher,
            seed=seed,
            device=ctx.device,
            ctx=ctx if ctx.distributed else None,
            root=root,
            progress=progress and ctx.is_main,
            restart=restart,
            keep_cache=keep_cache,
        )
        return stats, list(ckpt["class_names"])
    finally:
        cleanup(ctx)


def format_stats(stats: dict, class_names: list[str]) -> str:
    """Per-class table of a generation: labeled share, target n_j, pixels reaching the
    threshold, pixels kept; then the KL divergences and the labeled fraction."""
    ratio = stats.get("labeled_ratio")
    targets = stats.get("targets")
    lines = [
        f"{'class':<14}{'labeled %':>10}{'target':>12}{'thresholded':>13}{'kept':>12}",
        "-" * 61,
    ]
    for j, name in enumerate(class_names):
        share = f"{100 * ratio[j]:.2f}" if ratio else "-"
        target = str(targets[j]) if targets else "-"
        lines.append(
            f"{name:<14}{share:>10}{target:>12}{stats['thresholded'][j]:>13}{stats['final'][j]:>12}"
        )
    lines.append("-" * 61)
    lines.append(
        f"pseudo-labeled pixels: {100 * stats['labeled_fraction']:.2f} % of {stats['pixels']}"
    )
    if stats.get("kl_final") is not None:
        lines.append(
            f"KL(labeled || pseudo): {stats['kl_thresholded']:.4f} after thresholds, {stats['kl_final']:.4f} final"
        )
    return "\n".join(lines)
