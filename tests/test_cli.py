"""The `semiseg` command line end to end on the tiny synthetic setup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_config
from PIL import Image

from semiseg.cli import main
from semiseg.data.splits import read_split


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    config = out.parent / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(synthetic_root, out)))
    assert (
        main(["train", str(config), "train.iterations=6", "train.eval_every=6", "--no-progress"])
        == 0
    )
    return out


def test_train_saves_the_resolved_config_with_overrides(trained_run):
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["train"]["iterations"] == 6


def test_eval_prints_a_per_class_table(trained_run, capsys):
    assert main(["eval", str(trained_run / "best.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "ground" in out and "sign" in out


def test_predict_writes_palette_masks_at_image_size(trained_run, synthetic_root, tmp_path):
    images = synthetic_root / "data" / "images" / "val"
    assert (
        main(
            [
                "predict",
                str(trained_run / "best.pt"),
                str(images),
                str(tmp_path / "pred"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    sources = sorted(images.iterdir())
    preds = sorted((tmp_path / "pred").glob("*.png"))
    assert [p.stem for p in preds] == [p.stem for p in sources]
    with Image.open(preds[0]) as pred, Image.open(sources[0]) as src:
        assert pred.mode == "P" and pred.size == src.size
        assert np.array(pred).max() < 6


def test_split_is_reproducible_and_disjoint(synthetic_root, tmp_path):
    root = synthetic_root / "data"
    for name in ("a", "b"):
        assert (
            main(
                [
                    "split",
                    "--root",
                    str(root),
                    "--fraction",
                    "1/4",
                    "--seed",
                    "3",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    a = (tmp_path / "a" / "labeled.txt").read_text()
    assert a == (tmp_path / "b" / "labeled.txt").read_text()
    labeled = read_split(tmp_path / "a" / "labeled.txt", root, require_mask=True)
    unlabeled = read_split(tmp_path / "a" / "unlabeled.txt", root, require_mask=False)
    assert len(labeled) == 8 and len(unlabeled) == 24
    assert not {s.image for s in labeled} & {s.image for s in unlabeled}
    assert len(read_split(tmp_path / "a" / "val.txt", root, require_mask=True)) == 8


def test_errors_are_reported_with_exit_code_2(synthetic_root, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(synthetic_root, tmp_path / "run", optim={"learning_rate": 1}))
    )
    assert main(["train", str(config)]) == 2
    assert "unknown key 'optim.learning_rate'" in capsys.readouterr().err
    missing = tiny_config(
        synthetic_root, tmp_path / "run", data={"labeled": str(tmp_path / "nope.txt")}
    )
    config.write_text(yaml.safe_dump(missing))
    assert main(["train", str(config)]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
