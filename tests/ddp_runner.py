"""Train several configs in one torchrun process group (one process start for many runs):
`python -m torch.distributed.run --nproc_per_node 2 tests/ddp_runner.py A.yaml B.yaml ...`.
Each rank writes RESULTS_DIR/<config stem>.rank<r>.json with the run's final record."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from semiseg.config import load_config
from semiseg.training import train


def main(paths: list[str]) -> None:
    # Joined once here, the group outlives every run: a gloo group cannot be re-created
    # reliably in the same processes (see semiseg.distributed.DistContext.owner).
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(os.environ["RESULTS_DIR"])
    for path in paths:
        result = train(load_config(path), progress=False)
        (out / f"{Path(path).stem}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
