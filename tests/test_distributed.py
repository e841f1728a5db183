"""A real two-process DistributedDataParallel run (gloo on CPU) launched by torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_config

from semiseg.checkpoint import load_checkpoint
from semiseg.metrics_log import read_metrics


def _free_port() -> int:
    # torchrun's --master_port 0 does not pick a free port for the c10d store; ask the OS.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_trains_and_checkpoints(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(synthetic_root, out, train={"iterations": 8, "eval_every": 4, "log_every": 2, "threads": 1}))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "semiseg.cli", "train", str(config), "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["iteration"] == 8
    # One RNG state per process, so a resumed two-process run continues both streams.
    assert len(ckpt["rng"]) == 2
    assert (out / "best.pt").is_file()
    records = read_metrics(out / "metrics.jsonl")
    # Only rank 0 logs: each logged iteration appears once.
    train_iters = [r["iteration"] for r in records if r["split"] == "train"]
    assert train_iters == [2, 4, 6, 8]
    assert [r["iteration"] for r in records if r["split"] == "val"] == [4, 8]
