"""The training loop on a tiny model: learning, checkpoints, exact resume, bad-data errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import CHILD_LIMIT_S, crash_at, tiny_config, wait_for_child

from semiseg.checkpoint import load_checkpoint
from semiseg.config import ConfigError, config_from_dict
from semiseg.data.formats import DataError
from semiseg.engine import Trainer, _pace, poly_factor
from semiseg.metrics_log import read_metrics
from semiseg.training import train


def test_poly_schedule():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)


def test_training_loss_falls_and_writes_the_run_folder(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(
        tiny_config(
            synthetic_root, out, train={"iterations": 60, "eval_every": 30, "log_every": 10}
        )
    )
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]
    for name in ("config.yaml", "latest.pt", "best.pt", "final.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    final = json.loads((out / "final.json").read_text())
    assert final["iteration"] == 60 and 0 < result["best_miou"] <= 1
    val = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "val"]
    assert [r["iteration"] for r in val] == [30, 60]
    assert "iou/ground" in val[0]


def _state(run: Path) -> dict:
    return load_checkpoint(run / "latest.pt")


def test_killed_run_resumes_to_the_same_state(synthetic_root, tmp_path, monkeypatch):
    overrides = {
        "train": {"iterations": 12, "eval_every": 6, "checkpoint_every": 4, "log_every": 2}
    }
    reference = tmp_path / "reference"
    train(config_from_dict(tiny_config(synthetic_root, reference, **overrides)), progress=False)

    killed = tmp_path / "killed"
    # Dies two iterations after the checkpoint at 8: those steps are lost and redone.
    cfg = config_from_dict(tiny_config(synthetic_root, killed, **overrides))
    crash_at(cfg, 10, monkeypatch)
    assert _state(killed)["iteration"] == 8
    train(cfg, progress=False)

    a, b = _state(reference), _state(killed)
    assert b["iteration"] == 12
    for key, tensor in a["models"]["student"].items():
        assert torch.equal(tensor, b["models"]["student"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert a["best"] == b["best"]
    # The log of the resumed run reads as one run: no duplicated iterations.
    iterations = [
        r["iteration"] for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"
    ]
    assert iterations == [2, 4, 6, 8, 10, 12]
    # Each start recorded its machine: the first at iteration 0, the resume at 8.
    starts = [json.loads(line) for line in (killed / "environment.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in starts] == [0, 8]
    assert all(s["torch"] == torch.__version__ for s in starts)


def test_resume_refuses_a_different_config(synthetic_root, tmp_path):
    out = tmp_path / "run"
    train(
        config_from_dict(
            tiny_config(synthetic_root, out, train={"iterations": 4, "eval_every": 4})
        ),
        progress=False,
    )
    changed = config_from_dict(
        tiny_config(
            synthetic_root, out, train={"iterations": 4, "eval_every": 4}, optim={"lr": 0.5}
        )
    )
    with pytest.raises(ConfigError, match="optim.lr"):
        Trainer(changed, progress=False)
    Trainer(changed, restart=True, progress=False)


def test_ema_evaluation_and_pspnet_aux(synthetic_root, tmp_path):
    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            model={"name": "pspnet", "backbone": "tiny", "pretrained": None},
            scheme={"ema_decay": 0.99, "eval_ema": True},
            train={"iterations": 4, "eval_every": 4, "log_every": 2},
        )
    )
    train(cfg, progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any("loss_aux_x" in r for r in records if r["split"] == "train")
    ckpt = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert ckpt["scheme"]["ema"] is not None


def test_bad_mask_fails_before_training(synthetic_root, tmp_path):
    import numpy as np
    from PIL import Image

    data = synthetic_root / "data"
    bad_list = tmp_path / "bad.txt"
    first = (synthetic_root / "labeled.txt").read_text().splitlines()[0]
    image_rel, mask_rel = first.split()
    mask = np.array(Image.open(data / mask_rel))
    mask[0, 0] = 42
    broken = tmp_path / "broken_mask.png"
    Image.fromarray(mask).save(broken)
    bad_list.write_text(f"{image_rel} {broken}\n")
    cfg = config_from_dict(
        tiny_config(synthetic_root, tmp_path / "run", data={"labeled": str(bad_list)})
    )
    with pytest.raises(DataError, match="broken_mask.png"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_bf16_autocast_trains_on_cpu(synthetic_root, tmp_path):
    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            train={"iterations": 2, "eval_every": 2, "amp": "bf16"},
        )
    )
    result = train(cfg, progress=False)
    assert result["iteration"] == 2 and 0 <= result["best_miou"] <= 1


def test_each_logged_window_says_how_much_of_a_step_waited_for_data(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            out,
            scheme={"name": "fixmatch"},
            train={"iterations": 4, "eval_every": 4, "log_every": 2},
        )
    )
    train(cfg, progress=False)
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert all(0 <= r["data_wait_share"] <= 1 and r["data_sec_per_iter"] >= 0 for r in records)


@pytest.mark.slow
def test_compiled_networks_train_and_save_plain_weights(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(
        tiny_config(synthetic_root, out, train={"iterations": 2, "eval_every": 2, "compile": True})
    )
    result = train(cfg, progress=False)
    assert result["iteration"] == 2 and 0 <= result["best_miou"] <= 1
    # The checkpoint holds the network's own names, not the compiled wrapper's.
    assert not any(
        k.startswith("_orig_mod") for k in load_checkpoint(out / "latest.pt")["models"]["student"]
    )


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_weights(synthetic_root, tmp_path):
    """A real `kill -9` of `semiseg train` after its first checkpoint, then the same command again."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    overrides = {
        "train": {
            "iterations": 16,
            "eval_every": 8,
            "checkpoint_every": 4,
            "log_every": 4,
            "threads": 1,
        }
    }
    reference = tmp_path / "reference"
    train(config_from_dict(tiny_config(synthetic_root, reference, **overrides)), progress=False)

    run = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(tiny_config(synthetic_root, run, **overrides)))
    cmd = [sys.executable, "-m", "semiseg.cli", "train", str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_child((run / "latest.pt").exists, proc, "a first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(run / "latest.pt")["iteration"]
    assert 0 < killed_at < 16

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_LIMIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _state(reference), _state(run)
    assert b["iteration"] == 16
    for key, tensor in a["models"]["student"].items():
        assert torch.equal(tensor, b["models"]["student"][key]), key


def test_warm_start_loads_every_model_and_teacher(synthetic_root, tmp_path):
    source = tmp_path / "source"
    train(
        config_from_dict(
            tiny_config(synthetic_root, source, train={"iterations": 4, "eval_every": 4})
        ),
        progress=False,
    )
    weights = load_checkpoint(source / "latest.pt")["eval_model"]

    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            tmp_path / "warm",
            model={"init_from": str(source / "latest.pt")},
            scheme={"name": "mean_teacher"},
            policy={"name": "threshold"},
        )
    )
    trainer = Trainer(cfg, progress=False)
    for model in [*trainer.scheme.models.values(), trainer.scheme.eval_model()]:
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_warm_start_per_student(synthetic_root, tmp_path):
    sources = []
    for k, lr in enumerate([0.01, 0.05]):
        folder = tmp_path / f"source{k}"
        cfg = tiny_config(
            synthetic_root, folder, train={"iterations": 2, "eval_every": 2}, optim={"lr": lr}
        )
        train(config_from_dict(cfg), progress=False)
        sources.append(str(folder / "latest.pt"))
    cps = {"name": "cps"}
    trainer = Trainer(
        config_from_dict(
            tiny_config(synthetic_root, tmp_path / "cps", model={"init_from": sources}, scheme=cps)
        ),
        progress=False,
    )
    for name, path in zip(["student", "student_b"], sources, strict=True):
        weights = load_checkpoint(path)["eval_model"]
        state = trainer.scheme.models[name].state_dict()
        assert all(torch.equal(state[k], v) for k, v in weights.items()), name

    three = tiny_config(
        synthetic_root, tmp_path / "bad", model={"init_from": [*sources, sources[0]]}, scheme=cps
    )
    with pytest.raises(
        ValueError,
        match=r"model.init_from: 3 checkpoints .* 2 network\(s\) \['student', 'student_b'\]",
    ):
        Trainer(config_from_dict(three), progress=False)


def test_warm_start_errors_name_the_file(synthetic_root, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match="model.init_from: checkpoint not found: .*nope.pt"):
        Trainer(
            config_from_dict(
                tiny_config(synthetic_root, tmp_path / "a", model={"init_from": str(missing)})
            ),
            progress=False,
        )

    source = tmp_path / "source"
    train(
        config_from_dict(
            tiny_config(synthetic_root, source, train={"iterations": 2, "eval_every": 2})
        ),
        progress=False,
    )
    other = tiny_config(
        synthetic_root,
        tmp_path / "b",
        model={"name": "pspnet", "init_from": str(source / "latest.pt")},
    )
    with pytest.raises(ValueError, match="init_from: .*latest.pt does not fit"):
        Trainer(config_from_dict(other), progress=False)


@pytest.mark.parametrize("scheme", ["unimatch", "cps"])
def test_augmenting_on_the_device_trains_exactly_as_the_loaders(
    synthetic_root, tmp_path, scheme, monkeypatch
):
    """On the CPU, augment_on=device runs the loaders' transforms with the loaders' draws in
    the training process: the same batches, so the same weights after a few steps."""
    import semiseg.engine

    batches = []

    def spy(batch, transform, device):
        batches.append(len(batch["seed"]))
        return augment_on_device(batch, transform, device)

    augment_on_device = semiseg.engine.augment_on_device
    monkeypatch.setattr(semiseg.engine, "augment_on_device", spy)
    weights = {}
    for where in ("loader", "device"):
        cfg = config_from_dict(
            tiny_config(
                synthetic_root,
                tmp_path / where,
                data={"augment_on": where},
                scheme={"name": scheme, "oracle_eval": True},
                train={"iterations": 3, "eval_every": 3},
            )
        )
        train(cfg, progress=False)
        weights[where] = _state(tmp_path / where)["models"]
        # Only the device run augments in the training process: 3 steps of a labeled batch,
        # an unlabeled one and a CutMix source (both schemes mix two unlabeled batches), of 4.
        assert batches == ([] if where == "loader" else [4] * 9)
    assert weights["loader"].keys() == weights["device"].keys()
    for name, model in weights["loader"].items():
        for key, value in model.items():
            assert torch.equal(value, weights["device"][name][key]), (name, key)


def test_augment_on_names_its_choices():
    with pytest.raises(ConfigError, match="data.augment_on"):
        config_from_dict({"data": {"augment_on": "gpu"}})


def test_cuda_sync_names_its_choices(synthetic_root, tmp_path):
    cfg = tiny_config(synthetic_root, tmp_path / "run", train={"cuda_sync": "block"})
    assert config_from_dict(cfg).train.cuda_sync == "block"
    with pytest.raises(ConfigError, match="train.cuda_sync"):
        config_from_dict({"train": {"cuda_sync": "spin"}})


def test_pace_line_after_an_evaluation():
    # 100 steps in 100 s since this process started at iteration 100: 1 s/iter, and the 800
    # steps left of 1,000 take 800 s (13 min); 8,000 left take 2.2 h.
    started = (time.perf_counter() - 100.0, 100)
    assert _pace(started, 200, 1000) == "; 1.00 s/iter, 13 min left"
    assert _pace(started, 200, 8200) == "; 1.00 s/iter, 2.2 h left"
    assert _pace(started, 1000, 1000) == ""
    assert _pace((time.perf_counter(), 200), 200, 1000) == ""
