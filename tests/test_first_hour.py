"""What a new user meets in the first hour: bad files caught up front, Ctrl-C and SIGTERM
that keep the work, one-line errors, checkpoints usable from anywhere, predict, split,
plots and export."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CHILD_LIMIT_S, tiny_config, wait_for_child
from PIL import Image

from semiseg.checkpoint import load_checkpoint
from semiseg.cli import main
from semiseg.config import ConfigError, config_from_dict, load_config
from semiseg.data.formats import DataError
from semiseg.engine import Trainer
from semiseg.stop_signals import TrainingInterrupted, leave_stops_to_the_main_process
from semiseg.training import train


def truncated_jpeg(source: Path, target: Path) -> Path:
    """A JPEG whose header reads and whose pixels end early (a half-copied file)."""
    Image.open(source).convert("RGB").save(target, format="JPEG", quality=95)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def list_with(path: Path, lines: list[str], broken: dict[int, str]) -> Path:
    """`lines` with the image of line i replaced by `broken[i]`."""
    out = []
    for i, line in enumerate(lines):
        fields = line.split()
        if i in broken:
            fields[0] = broken[i]
        out.append(" ".join(fields))
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize("which", ["labeled", "unlabeled", "val"])
def test_a_truncated_jpeg_in_any_list_fails_before_training(synthetic_root, tmp_path, which):
    data = synthetic_root / "data"
    raw = tiny_config(synthetic_root, tmp_path / "run", scheme={"name": "fixmatch"})
    lines = Path(raw["data"][which]).read_text().splitlines()
    first, second = (
        truncated_jpeg(data / line.split()[0], tmp_path / f"broken{i}.jpg")
        for i, line in enumerate(lines[:2])
    )
    raw["data"][which] = str(
        list_with(tmp_path / f"{which}.txt", lines, {0: str(first), 1: str(second)})
    )
    with pytest.raises(DataError) as err:
        Trainer(config_from_dict(raw), progress=False)
    # Both problems of the list at once, each naming its file.
    assert (
        "broken0.jpg" in str(err.value)
        and "broken1.jpg" in str(err.value)
        and "2 problem(s)" in str(err.value)
    )


def test_every_missing_file_of_a_list_is_reported_together(synthetic_root, tmp_path):
    lines = (synthetic_root / "labeled.txt").read_text().splitlines()
    bad = list_with(tmp_path / "bad.txt", lines, {0: "nope-a.png", 3: "nope-b.png"})
    raw = tiny_config(synthetic_root, tmp_path / "run", data={"labeled": str(bad)})
    with pytest.raises(DataError, match="2 problem") as err:
        Trainer(config_from_dict(raw), progress=False)
    assert "nope-a.png" in str(err.value) and "nope-b.png" in str(err.value)


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["models"]["student"]


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_is_exact(
    synthetic_root, tmp_path, monkeypatch
):
    sections = {
        "scheme": {"name": "unimatch"},
        "policy": {"name": "daw"},
        "train": {"iterations": 6, "eval_every": 6, "log_every": 1},
    }
    train(
        config_from_dict(tiny_config(synthetic_root, tmp_path / "ref", **sections)), progress=False
    )

    original = Trainer._set_lr

    def signalled(self, iteration):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 2 runs
        return original(self, iteration)

    monkeypatch.setattr(Trainer, "_set_lr", signalled)
    cfg = config_from_dict(tiny_config(synthetic_root, tmp_path / "stopped", **sections))
    with pytest.raises(TrainingInterrupted, match="SIGTERM at iteration 3") as stop:
        train(cfg, progress=False)
    assert stop.value.exit_code == 143
    monkeypatch.setattr(Trainer, "_set_lr", original)
    assert load_checkpoint(tmp_path / "stopped" / "latest.pt")["iteration"] == 3
    # The handlers are the previous ones again once training stopped.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    train(cfg, progress=False)
    a, b = _weights(tmp_path / "ref" / "latest.pt"), _weights(tmp_path / "stopped" / "latest.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _worker_that_sleeps(ready) -> None:
    leave_stops_to_the_main_process(0)
    ready.set()
    time.sleep(CHILD_LIMIT_S)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="no sender of a signal to read")
def test_a_worker_ignores_sigterm_from_others_and_ends_on_its_parents():
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_worker_that_sleeps, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(CHILD_LIMIT_S)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # a scheduler, say
    worker.join(timeout=1.0)
    assert worker.is_alive()
    worker.terminate()  # what multiprocessing does to daemonic workers at exit
    worker.join(timeout=CHILD_LIMIT_S)
    assert worker.exitcode == -signal.SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [False, True], ids=["process", "process-group"])
def test_the_cli_exits_with_one_line_on_sigterm_and_resumes(synthetic_root, tmp_path, whole_group):
    # A job scheduler (SLURM, `kill -TERM -- -PGID`, `pkill -f`) signals every process of the
    # job, DataLoader workers included: they must leave the stop to the main process.
    out = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_config(
                synthetic_root,
                out,
                data={"workers": 2 if whole_group else 0},
                train={"iterations": 400, "eval_every": 400, "log_every": 1, "threads": 1},
            )
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "semiseg.cli", "train", str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=whole_group,
    )
    metrics = out / "metrics.jsonl"
    wait_for_child(
        lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2,
        process,
        "two logged steps",
    )
    if whole_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=CHILD_LIMIT_S)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM at iteration" in stderr
    # The checkpoint is the step the run stopped at (resuming from it is exact: see above).
    assert 2 <= load_checkpoint(out / "latest.pt")["iteration"] < 400


def test_temporary_files_of_killed_writes_are_gone_when_a_run_finishes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    (out / "plots").mkdir(parents=True)
    for name in (".latest.pt.abc123.tmp", ".best.pt.x.tmp", "plots/.curves.png.y.tmp"):
        (out / name).write_bytes(b"half")
    train(
        config_from_dict(
            tiny_config(synthetic_root, out, train={"iterations": 2, "eval_every": 2})
        ),
        progress=False,
    )
    assert not list(out.rglob("*.tmp"))


def test_pseudo_labels_add_up_the_time_of_every_attempt_and_drop_their_cache(
    synthetic_root, tmp_path, monkeypatch
):
    import semiseg.offline.label_set as label_set

    train(
        config_from_dict(
            tiny_config(
                synthetic_root, tmp_path / "teacher", train={"iterations": 2, "eval_every": 2}
            )
        ),
        progress=False,
    )
    teacher, out = tmp_path / "teacher" / "latest.pt", tmp_path / "pl"
    original, written = label_set.atomic_write, []

    def dying(path, write):
        if path.suffix == ".png" and len(written) == 3:
            raise KeyboardInterrupt
        original(path, write)
        if path.suffix == ".png":
            time.sleep(0.1)  # time the first attempt spends, which its successor must count
            written.append(path)

    monkeypatch.setattr(label_set, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        label_set.pseudo_label_checkpoint(
            teacher, out, label_set.GeneratorSpec("dars", alpha=0.3), progress=False
        )
    monkeypatch.setattr(label_set, "atomic_write", original)
    (out / "labels" / ".000004_x.png.abc.tmp").write_bytes(b"half")
    first = json.loads((out / "timing.json").read_text())["seconds"]
    stats, _ = label_set.pseudo_label_checkpoint(
        teacher, out, label_set.GeneratorSpec("dars", alpha=0.3), progress=False
    )
    assert stats["seconds"] > first >= 0.3
    assert (
        not (out / "cache").exists()
        and not (out / "timing.json").exists()
        and not list(out.rglob("*.tmp"))
    )
    assert len(list((out / "labels").glob("*.png"))) == 16


def test_running_a_finished_run_again_leaves_final_json_as_it_was(synthetic_root, tmp_path):
    out = tmp_path / "run"
    cfg = config_from_dict(
        tiny_config(synthetic_root, out, train={"iterations": 2, "eval_every": 2})
    )
    train(cfg, progress=False)
    first = (out / "final.json").read_text()
    assert json.loads(first)["final"]["miou"] >= 0
    train(cfg, progress=False)
    assert (out / "final.json").read_text() == first


def test_overrides_may_follow_flags_and_their_errors_name_them(synthetic_root, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_config(synthetic_root, tmp_path / "run", train={"iterations": 2, "eval_every": 2})
        )
    )
    assert (
        main(
            [
                "train",
                str(config),
                "--restart",
                "train.iterations=1",
                "--no-progress",
                "train.eval_every=1",
            ]
        )
        == 0
    )
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iteration"] == 1
    with pytest.raises(
        ConfigError, match=r"^the overrides optim.lr=fast: optim.lr: expected a number"
    ):
        load_config(config, ["optim.lr=fast"])
    capsys.readouterr()
    assert main(["train", str(config), "optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the overrides optim.lr=fast" in err


def test_errors_are_one_line_with_exit_code_2(synthetic_root, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    run = tmp_path / "run"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(synthetic_root, run, train={"iterations": 2, "eval_every": 2}))
    )
    assert main(["train", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    cases = {
        "not a semiseg checkpoint": ["eval", str(foreign)],
        "different config": ["train", str(config), "optim.lr=0.5"],
        "init_from": ["train", str(config), "--restart", f"model.init_from={foreign}"],
    }
    if not torch.cuda.is_available():
        cases["--device='cuda', but CUDA is not available"] = [
            "eval",
            str(run / "best.pt"),
            "--device",
            "cuda",
        ]
    for message, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_checkpoint_evaluates_from_any_folder_and_refuses_other_classes(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    raw = tiny_config(synthetic_root, Path("run"), train={"iterations": 2, "eval_every": 2})
    for key in ("root", "labeled", "unlabeled", "val"):
        raw["data"][key] = os.path.relpath(raw["data"][key], work)
    train(config_from_dict(raw), progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(work / "run" / "best.pt")]) == 0
    assert "mIoU" in capsys.readouterr().out
    # The same images under a classes.txt of 3 classes: the 6-class checkpoint refuses them.
    other = tmp_path / "three"
    (other / "splits").mkdir(parents=True)
    (other / "classes.txt").write_text("a\nb\nc\n")
    assert (
        main(
            [
                "eval",
                str(work / "run" / "best.pt"),
                "--data-root",
                str(other),
                "--val",
                str(synthetic_root / "data" / "splits" / "val.txt"),
            ]
        )
        == 2
    )
    assert "predicts 6 classes but the folder data" in capsys.readouterr().err


def test_predict_keeps_both_outputs_of_images_with_one_stem(synthetic_root, tmp_path):
    from semiseg.inference import predict_folder

    train(
        config_from_dict(
            tiny_config(synthetic_root, tmp_path / "run", train={"iterations": 1, "eval_every": 1})
        ),
        progress=False,
    )
    images = tmp_path / "images"
    images.mkdir()
    first = sorted((synthetic_root / "data" / "images" / "val").iterdir())[0]
    Image.open(first).convert("RGB").save(images / "a.png")
    Image.open(first).convert("RGB").save(images / "a.jpg")
    Image.open(first).convert("RGB").save(images / "b.png")
    assert (
        predict_folder(tmp_path / "run" / "best.pt", images, tmp_path / "masks", device="cpu") == 3
    )
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "a.jpg.png",
        "a.png.png",
        "b.png",
    ]


def test_split_of_a_folder_dataset_whose_unlabeled_images_have_no_mask(
    synthetic_root, tmp_path, capsys
):
    data = synthetic_root / "data"
    root = tmp_path / "folder"
    for subset in ("train", "val"):
        (root / "images" / subset).mkdir(parents=True)
        (root / "masks" / subset).mkdir(parents=True)
    (root / "classes.txt").write_text((data / "classes.txt").read_text())
    images = sorted((data / "images" / "train").iterdir())[:10]
    for i, image in enumerate(images):
        (root / "images" / "train" / image.name).write_bytes(image.read_bytes())
        if i < 4:  # only 4 of the 10 training images are annotated
            mask = data / "masks" / "train" / f"{image.stem}.png"
            (root / "masks" / "train" / mask.name).write_bytes(mask.read_bytes())
    for image in sorted((data / "images" / "val").iterdir())[:2]:
        (root / "images" / "val" / image.name).write_bytes(image.read_bytes())
        mask = data / "masks" / "val" / f"{image.stem}.png"
        (root / "masks" / "val" / mask.name).write_bytes(mask.read_bytes())
    out = tmp_path / "splits"
    assert (
        main(
            [
                "split",
                "--format",
                "folder",
                "--root",
                str(root),
                "--fraction",
                "1/2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        "2 labeled, 8 unlabeled of 10 (6 images without a mask, all unlabeled)"
        in capsys.readouterr().out
    )
    labeled = (out / "labeled.txt").read_text().splitlines()
    unlabeled = (out / "unlabeled.txt").read_text().splitlines()
    assert len(labeled) == 2 and all(len(line.split()) == 2 for line in labeled)
    assert len(unlabeled) == 8 and sum(len(line.split()) == 1 for line in unlabeled) == 6
    # A list of image-only lines splits the same way.
    assert (
        main(
            [
                "split",
                "--root",
                str(root),
                "--list",
                str(out / "unlabeled.txt"),
                "--count",
                "1",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )


def test_every_run_gets_training_curves_and_daw_gets_a_readable_t_star(synthetic_root, tmp_path):
    supervised = tmp_path / "supervised"
    train(
        config_from_dict(
            tiny_config(
                synthetic_root, supervised, train={"iterations": 4, "eval_every": 2, "log_every": 1}
            )
        ),
        progress=False,
    )
    assert main(["plot", str(supervised)]) == 0
    assert (supervised / "plots" / "training_curves.png").is_file()
    daw = tmp_path / "daw"
    cfg = tiny_config(
        synthetic_root,
        daw,
        scheme={"name": "unimatch"},
        policy={"name": "daw"},
        train={"iterations": 4, "eval_every": 2, "log_every": 1},
    )
    train(config_from_dict(cfg), progress=False)
    assert main(["plot", str(daw), "--compare", str(supervised)]) == 0
    for name in (
        "training_curves.png",
        "pseudo_labels.png",
        "daw_fits.png",
        "val_miou_comparison.png",
    ):
        assert (daw / "plots" / name).is_file(), name


def test_equal_accuracy_series_are_drawn_once():
    from semiseg.report import _same_series

    # A 0/1-weight policy's weight-averaged accuracy is its used-label accuracy: one curve.
    step = [{"a": 0.5, "w": 0.5}, {"a": 0.9, "w": 0.9}, {"x": 1.0}]
    assert _same_series(step, "a", "w")
    assert not _same_series([{"a": 0.5, "w": 0.45}], "a", "w")
    assert not _same_series([{"x": 1.0}], "a", "w")


@pytest.mark.parametrize("fmt", ["onnx", "torch-export", "torchscript"])
def test_export_gives_the_pytorch_outputs(synthetic_root, tmp_path, fmt):
    from semiseg.export import DeployedSegmenter
    from semiseg.inference import load_trained_model

    train(
        config_from_dict(
            tiny_config(synthetic_root, tmp_path / "run", train={"iterations": 1, "eval_every": 1})
        ),
        progress=False,
    )
    checkpoint = tmp_path / "run" / "best.pt"
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(checkpoint), str(out), "--format", fmt, "--size", "48", "64"]) == 0
    described = json.loads(out.with_name(out.name + ".json").read_text())
    assert described["input"]["shape"] == ["N", 3, 48, 64] and len(described["classes"]) == 6
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    model, _, _ = load_trained_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        expected = DeployedSegmenter(model).eval()(image).numpy()
    if fmt == "onnx":
        import onnxruntime

        got = onnxruntime.InferenceSession(str(out)).run(["logits"], {"image": image.numpy()})[0]
    elif fmt == "torch-export":
        got = torch.export.load(str(out)).module()(image).detach().numpy()
    else:
        # torch warns on load that TorchScript is deprecated; the format stays for deployments
        # that still load it, and the warning is not this test's concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(out))
        got = loaded(image).detach().numpy()
    assert got.shape == (2, 6, 48, 64)
    assert np.abs(got - expected).max() < 1e-4
