"""The layout of every folder semiseg writes, in one place: training runs, self-training
rounds, pseudo-label sets and detector folders. Every reader and writer goes through it.

A training run (`output_dir`)::

    config.yaml      the resolved config (what `semiseg train` ran)
    latest.pt        checkpoint for resume (models, optimiser, scheme state, RNG)
    best.pt          the evaluated network at the best val mIoU
    final.json       written when training ends (`final_record`): iterations, best and last scores
    metrics.jsonl    one JSON object per logged step and evaluation
    tensorboard/     the same scalars as TensorBoard events
    plots/           figures of `semiseg plot`
    <snapshots>/     per-evaluation arrays of a component (FPL: fpl_kmaps/iter_NNNNNN.npz)
    round<k>/        self-training: one run folder per round, round<k>/pseudo/ its pseudo labels

A pseudo-label set (`semiseg pseudo-label OUT`): labels/, list.txt and stats.json; cache/ and
timing.json only while it is being made (or with --keep-cache).
A detector folder (`policy.detector.dir`): latest.pt and detections/NNNNNN.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from semiseg.files import atomic_write_text


class RunFolder:
    """Paths inside one training run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    latest = property(lambda self: self.path / "latest.pt")
    best = property(lambda self: self.path / "best.pt")
    final = property(lambda self: self.path / "final.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    environment = property(lambda self: self.path / "environment.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    plots = property(lambda self: self.path / "plots")

    def snapshots(self, folder: str) -> Path:
        return self.path / folder

    def snapshot(self, folder: str, iteration: int) -> Path:
        return self.snapshots(folder) / f"iter_{iteration:06d}.npz"

    def round(self, k: int) -> RunFolder:
        return RunFolder(self.path / f"round{k}")

    @property
    def pseudo_labels(self) -> Path:
        """The pseudo-label set a self-training round learns from."""
        return self.path / "pseudo"

    def is_run(self) -> bool:
        return self.metrics.is_file() and self.config.is_file()

    def read_final(self) -> dict | None:
        return json.loads(self.final.read_text()) if self.final.is_file() else None

    def write_final(self, record: dict) -> None:
        atomic_write_text(self.final, json.dumps(record, indent=2) + "\n")

    def record_environment(self, record: dict) -> None:
        """Append one start's machine record (`semiseg.environment.describe`); a line
        append, like the metrics log's, so a kill loses at most that line."""
        with self.environment.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_environments(self) -> list[dict]:
        """Every recorded start of this run, oldest first; empty for runs from before the
        record existed."""
        # The metrics log's JSON-lines reader, which skips a line a kill tore (imported
        # here: metrics_log imports this module).
        from semiseg.metrics_log import read_metrics

        return read_metrics(self.environment) if self.environment.is_file() else []

    def record_files(self) -> list[Path]:
        """The small text files that document this run: its config, final scores, training
        log and machine records, and per self-training round the same with the round's
        pseudo-label statistics. What a results folder keeps of a finished run; weights,
        caches, label images and event files stay in the run folder."""
        names = ("config.yaml", "final.json", "metrics.jsonl", "environment.jsonl")
        files = [self.path / name for name in names]
        for round_path in sorted(self.path.glob("round[0-9]*")):
            files += [round_path / name for name in names]
            files.append(PseudoLabelFolder(RunFolder(round_path).pseudo_labels).stats)
        return [f for f in files if f.is_file()]

    def metrics_folder(self) -> RunFolder:
        """The run folder whose metrics.jsonl holds this run's training log (the last round
        of a self-training run)."""
        final = self.read_final() or {}
        return RunFolder(self.path / final.get("metrics_dir", "."))


def final_record(
    iteration: int,
    best_miou: float,
    best_iteration: int,
    scores: dict | None,
    *,
    metrics_dir: str = ".",
    rounds: list[dict] | None = None,
    kl: float | None = None,
) -> dict:
    """The one shape of final.json: the iterations trained, the best val mIoU and where it
    was reached, the last evaluation's scores (per class included), the folder whose
    metrics.jsonl is the training log, and for self-training the rounds and the last
    round's KL divergence of pseudo labels to the labeled class distribution."""
    return {
        "iteration": iteration,
        "best_miou": best_miou,
        "best_iteration": best_iteration,
        "final": scores,
        "metrics_dir": metrics_dir,
        "rounds": rounds or [],
        "kl": kl,
    }


def read_snapshots(folder: Path) -> list[dict]:
    """Every snapshot saved in `folder` (a component's snapshot folder), in iteration order:
    {'iteration': int, 'images': uint8 [N,h,w,3], and the component's arrays}."""
    out = []
    for path in sorted(Path(folder).glob("iter_*.npz")):
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files if key != "iteration"}
            out.append({"iteration": int(data["iteration"]), **arrays})
    return out


class PseudoLabelFolder:
    """Paths of a pseudo-label set written by `semiseg pseudo-label`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    stats = property(lambda self: self.path / "stats.json")
    split_list = property(lambda self: self.path / "list.txt")
    labels = property(lambda self: self.path / "labels")
    cache = property(lambda self: self.path / "cache")
    timing = property(lambda self: self.path / "timing.json")

    def cache_file(self, index: int) -> Path:
        return self.cache / f"{index:06d}.npz"

    def label_file(self, index: int, image: Path) -> Path:
        # The index keeps names unique when two folders hold files of the same name.
        return self.labels / f"{index:06d}_{image.stem}.png"

    def clear(self) -> None:
        """Remove everything a generation wrote here (the folder itself stays)."""
        self.stats.unlink(missing_ok=True)
        self.split_list.unlink(missing_ok=True)
        self.timing.unlink(missing_ok=True)
        for sub in (self.labels, self.cache):
            if sub.is_dir():
                shutil.rmtree(sub)


class DetectorFolder:
    """Paths of the RPPI detector's folder (`policy.detector.dir`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    latest = property(lambda self: self.path / "latest.pt")
    detections = property(lambda self: self.path / "detections")

    def detection_file(self, index: int) -> Path:
        return self.detections / f"{index:06d}.json"
