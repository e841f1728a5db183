"""Shared fixtures: a small synthetic dataset and a config for a tiny model that trains in seconds."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from semiseg.data.splits import make_split, read_split, write_split
from semiseg.data.synthetic import make_synthetic_dataset

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2-core CI machines; oversubscribing threads makes them slower, not faster.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    data = make_synthetic_dataset(root / "data", num_train=32, num_val=8, size=(48, 64), seed=0)
    samples = read_split(data / "splits" / "train.txt", data, require_mask=True)
    labeled, unlabeled = make_split(samples, count=16, seed=0)
    write_split(root / "labeled.txt", labeled, data)
    write_split(root / "unlabeled.txt", unlabeled, data)
    return root


def tiny_config(root: Path, output_dir: Path, **sections) -> dict:
    """A config dict for the tiny CNN on the synthetic data; `sections` update single keys."""
    cfg = {
        "data": {
            "format": "folder",
            "root": str(root / "data"),
            "labeled": str(root / "labeled.txt"),
            "unlabeled": str(root / "unlabeled.txt"),
            "val": str(root / "data" / "splits" / "val.txt"),
            "crop_size": 32,
            "scale_range": [0.75, 1.25],
            "batch_size": 4,
            "workers": 0,
        },
        "model": {"name": "deeplabv3plus", "backbone": "tiny", "pretrained": None},
        "optim": {"lr": 0.01},
        "train": {"iterations": 12, "eval_every": 6, "log_every": 2, "seed": 0, "device": "cpu"},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_grid(
    folder: Path, base_cfg: dict, methods: dict, *, name: str = "tiny", seeds=(0, 1), **extra
) -> Path:
    """Write `base_cfg` and a bench grid over it into `folder`; runs go to `folder / "bench"`."""
    base = folder / "base.yaml"
    base.write_text(yaml.safe_dump(base_cfg))
    grid = {
        "name": name,
        "base": str(base),
        "output_dir": str(folder / "bench"),
        "seeds": list(seeds),
        "methods": methods,
        **extra,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


class Killed(Exception):
    """Stands for the process dying between two training steps."""


def crash_at(cfg, at_iteration: int, monkeypatch) -> None:
    """Train `cfg` until it dies just before step `at_iteration`; the run folder keeps what it saved."""
    from semiseg.engine import Trainer
    from semiseg.training import train

    original = Trainer._set_lr

    def dying(self, iteration):
        if iteration == at_iteration:
            raise Killed
        return original(self, iteration)

    monkeypatch.setattr(Trainer, "_set_lr", dying)
    with pytest.raises(Killed):
        train(cfg, progress=False)
    monkeypatch.setattr(Trainer, "_set_lr", original)


# How long a test waits on a `semiseg` child process before calling it hung. It measures
# nothing: on a loaded CI machine a child can take minutes to import torch and reach its first
# checkpoint (a 120 s limit failed beside a training run, at 1.2 s per tiny step).
CHILD_LIMIT_S = 1800.0


def wait_for_child(condition, process, what: str, limit_s: float = CHILD_LIMIT_S) -> None:
    """Poll `condition()` until it holds; fail naming `what` if `process` exits first or hangs."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            pytest.fail(f"the child exited with {process.returncode} before {what}\n{stderr}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"waited {limit_s:.0f} s for {what}: the child looks hung")
        time.sleep(0.1)
