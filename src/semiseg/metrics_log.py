"""Scalars to a JSON-lines file (easy to parse, survives crashes line by line) and TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from semiseg.run_folder import RunFolder


class MetricsLogger:
    """Appends one JSON object per event to `metrics.jsonl`; mirrors numbers to TensorBoard.

    On a resumed run the file keeps its earlier lines; events past the resumed
    iteration (written after the last checkpoint and before the kill) are dropped so
    the log reads as one uninterrupted run.
    """

    def __init__(
        self, run_dir: Path, resume_iteration: int | None = None, tensorboard: bool = True
    ):
        folder = RunFolder(run_dir)
        self.path = folder.metrics
        folder.path.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None and self.path.exists():
            self._truncate_after(resume_iteration)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder.tensorboard))
        self._handle = self.path.open("a")

    def _truncate_after(self, iteration: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= iteration:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, iteration: int, split: str, values: dict) -> None:
        record = {"iteration": iteration, "split": split, "time": round(time.time(), 3)}
        for key, value in values.items():
            value = float(value) if not isinstance(value, (int, str)) else value
            record[key] = value
            if self.writer is not None and not isinstance(value, str) and math.isfinite(value):
                self.writer.add_scalar(f"{split}/{key}", value, iteration)
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl file (skipping a torn last line)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def format_duration(seconds: float) -> str:
    """A training time as the progress lines and `semiseg bench --status` print it."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
