"""Training schedules given in epochs: `train.epochs`, resolved to iterations from the size
of the split list the scheme iterates over, the way the papers count.

One epoch is one pass over that list by every process together: with DistributedSampler's
padding and incomplete batches dropped, ceil(N / processes) // batch iterations (UniMatch's
`len(trainloader_u)`). Semi-supervised schemes count the unlabeled list (UniMatch, DAW,
rank weighting, CPS, whose max(labeled, unlabeled) is the unlabeled list), supervised
training the labeled list, a self-training round its pseudo-labeled list (the unlabeled
images: DARS repeats its labeled list to that length); `train.epoch_list` chooses another.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from semiseg.data.formats import DataError
from semiseg.data.splits import resolve_list


def list_length(path: str, root: str) -> int:
    """Samples in a split list (non-empty lines that are not comments)."""
    resolved = resolve_list(path, Path(root).expanduser())
    if not Path(resolved).is_file():
        raise DataError(f"{resolved}: split list does not exist")
    lines = Path(resolved).read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))


def epoch_list(cfg: Any) -> str:
    """The data key of the list one epoch passes over."""
    from semiseg.schemes import SCHEMES

    if cfg.train.epoch_list != "auto":
        return cfg.train.epoch_list
    scheme = SCHEMES.get(cfg.scheme.name)
    if scheme.views is not None or scheme.uses_pseudo_labels:
        return "unlabeled"
    return "labeled"


def iterations_per_epoch(samples: int, batch: int, processes: int = 1) -> int:
    return max(math.ceil(samples / processes) // batch, 1)


def resolve(cfg: Any, processes: int = 1) -> tuple[Any, str | None]:
    """`cfg` with `train.iterations` resolved from `train.epochs` (unchanged without epochs),
    and a line saying how; the line is None when nothing was resolved."""
    epochs = cfg.train.epochs
    if epochs is None:
        return cfg, None
    key = epoch_list(cfg)
    path = getattr(cfg.data, key)
    if key == "unlabeled" and cfg.data.pseudo_labeled and Path(cfg.data.pseudo_labeled).is_file():
        path = cfg.data.pseudo_labeled
    if not path:
        raise DataError(f"train.epochs counts passes over data.{key}, which is not set")
    samples = list_length(path, cfg.data.root)
    batch = (
        cfg.data.batch_size
        if key == "labeled"
        else (cfg.data.unlabeled_batch_size or cfg.data.batch_size)
    )
    per_epoch = iterations_per_epoch(samples, batch, processes)
    iterations = max(round(epochs * per_epoch), 1)
    note = (
        f"train.epochs {epochs:g} over data.{key} ({samples} images, batch {batch} x {processes} "
        f"process{'es' if processes > 1 else ''}: {per_epoch} per epoch) = {iterations} iterations"
    )
    train = dataclasses.replace(cfg.train, iterations=iterations)
    return dataclasses.replace(cfg, train=train), note


def planned_iterations(cfg: Any, processes: int = 1) -> int:
    """The iterations a run of `cfg` trains for."""
    return resolve(cfg, processes)[0].train.iterations
