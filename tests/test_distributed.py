"""A real two-process DistributedDataParallel run (gloo on CPU) launched by torchrun."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def _torchrun(target: list[str], timeout: int = 300, **env: str) -> None:
    """Two gloo processes running `target` (`-m semiseg.cli ...` or a script); fails with
    the error lines of their output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), *target]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    errors = [line for line in done.stderr.splitlines() if "error:" in line or "Error" in line]
    assert done.returncode == 0, "\n".join(errors[:10]) or done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_gloo_run_trains_and_checkpoints(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_config(
                synthetic_root,
                out,
                train={"iterations": 8, "eval_every": 4, "log_every": 2, "threads": 1},
            )
        )
    )
    _torchrun(["-m", "semiseg.cli", "train", str(config), "--no-progress"])
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


@pytest.mark.slow
def test_two_process_self_training_and_pseudo_labels_match_one_process(synthetic_root, tmp_path):
    from semiseg.cli import main

    out = tmp_path / "st"
    config = tmp_path / "st.yaml"
    raw = tiny_config(
        synthetic_root,
        out,
        scheme={"name": "self_training", "alpha": [0.3]},
        train={"iterations": 2, "eval_every": 2, "log_every": 1, "threads": 1},
    )
    config.write_text(yaml.safe_dump(raw))
    # Round 0, pseudo labels (both processes label half the images) and round 1, with the
    # process group joined again after each part.
    _torchrun(["-m", "semiseg.cli", "train", str(config), "--no-progress"])
    assert load_checkpoint(out / "round1" / "latest.pt")["iteration"] == 2
    labels = sorted((out / "round1" / "pseudo" / "labels").glob("*.png"))
    assert len(labels) == 16

    teacher = str(out / "round0" / "latest.pt")
    _torchrun(
        [
            "-m",
            "semiseg.cli",
            "pseudo-label",
            teacher,
            str(tmp_path / "two"),
            "--alpha",
            "0.3",
            "--no-progress",
        ]
    )
    assert (
        main(["pseudo-label", teacher, str(tmp_path / "one"), "--alpha", "0.3", "--no-progress"])
        == 0
    )
    two = sorted((tmp_path / "two" / "labels").glob("*.png"))
    one = sorted((tmp_path / "one" / "labels").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def _push_from_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from semiseg.distributed import all_gather_pairs
    from semiseg.pseudo.memory import FeatureBank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bank = FeatureBank(
        num_classes=2, dim=1, size=8, per_update=2, gather=all_gather_pairs, seed=rank
    )
    # Rank r offers 5 features of value 10 r + i of class 0 and one of class 1 (only rank 1).
    features = (10.0 * rank + torch.arange(5.0)).unsqueeze(1)
    labels = torch.zeros(5, dtype=torch.long)
    if rank == 1:
        features, labels = (
            torch.cat([features, torch.tensor([[99.0]])]),
            torch.cat([labels, torch.tensor([1])]),
        )
    bank.push(features, labels)
    torch.save(bank.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_feature_bank_under_ddp_holds_every_ranks_features_on_every_rank(tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_push_from_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(a["queues"], b["queues"]) and torch.equal(a["counts"], b["counts"])
    assert a["counts"].tolist() == [4, 1]  # 2 random features per class and rank
    stored = a["queues"][0, :4, 0]
    # Newest first: rank 1's two come before rank 0's, and each rank's are its own values.
    assert all(10 <= v < 15 for v in stored[:2].tolist()) and all(
        0 <= v < 5 for v in stored[2:].tolist()
    )
    assert a["queues"][1, 0, 0].item() == 99.0


# One representative combination per scheme, under two-process gloo DDP: parameters a step
# leaves without gradient (STPG's projection heads before matching, PSPNet's auxiliary head
# under a semi-supervised scheme) used to stop DDP at the second step.
DDP_COMBINATIONS = {
    "supervised-pspnet": {"model": {"name": "pspnet"}},
    "fixmatch-daw": {"scheme": {"name": "fixmatch"}, "policy": {"name": "daw"}},
    "unimatch-pspnet": {
        "model": {"name": "pspnet"},
        "scheme": {"name": "unimatch"},
        "policy": {"name": "threshold", "threshold": 0.2},
    },
    "mean-teacher-rankweight-fpl": {
        "scheme": {"name": "mean_teacher"},
        "policy": {"name": "rankweight", "threshold": 0.0, "rppi": False},
        "loss": {"name": "fpl"},
    },
    "cps-ael": {"scheme": {"name": "cps"}, "policy": {"name": "ael"}},
    "stpg-match-after-2": {
        "scheme": {
            "name": "stpg",
            "match_after": 2,
            "anchor_steps": 20,
            "bank_topk": 8,
            "phi": 0.0,
        },
        "policy": {"name": "pseudo_label"},
    },
    "stpg-no-contrast": {
        "scheme": {"name": "stpg", "lambda_ctr": 0.0},
        "policy": {"name": "pseudo_label"},
    },
    "self-training": {"scheme": {"name": "self_training", "alpha": [0.3]}},
}


@pytest.mark.slow
def test_one_combination_per_scheme_trains_under_two_process_ddp(synthetic_root, tmp_path):
    import json

    paths = []
    for name, sections in DDP_COMBINATIONS.items():
        raw = tiny_config(
            synthetic_root,
            tmp_path / name,
            train={"iterations": 3, "eval_every": 3, "log_every": 1, "threads": 1},
        )
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        paths.append(str(path))
    runner = Path(__file__).with_name("ddp_runner.py")
    _torchrun([str(runner), *paths], timeout=900, RESULTS_DIR=str(tmp_path))
    for name in DDP_COMBINATIONS:
        results = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["iteration"] == 3 for r in results), name
        folder = tmp_path / name / results[0]["metrics_dir"]
        losses = [
            r["loss"] for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train"
        ]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses), name
    stpg = [
        r
        for r in read_metrics(tmp_path / "stpg-match-after-2" / "metrics.jsonl")
        if r["split"] == "train"
    ]
    assert stpg[0]["loss_ac"] == 0 and stpg[-1]["loss_ac"] > 0
