from pathlib import Path

import pytest
import yaml

from semiseg.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
)

BASE = {"data": {"root": "data", "labeled": "labeled.txt"}}


def test_overrides_win_over_file_and_are_typed(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "optim": {"lr": 0.5}}))
    cfg = load_config(
        path, ["optim.lr=0.01", "data.scale_range=[0.5,1.5]", "model.pretrained=null"]
    )
    assert cfg.optim.lr == 0.01
    assert cfg.data.scale_range == (0.5, 1.5)
    assert cfg.model.pretrained is None


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert config_from_dict({**BASE, "optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.iterations: expected an integer"):
        config_from_dict({**BASE, "train": {"iterations": 10.5}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({**BASE, "optim": {"learning_rate": 0.1}}, "unknown key 'optim.learning_rate'"),
        ({**BASE, "bogus": 1}, "unknown key 'bogus'"),
        (
            {**BASE, "data": {**BASE["data"], "crop_size": "big"}},
            "data.crop_size: expected an integer",
        ),
        ({**BASE, "train": {"amp": "fp8"}}, "train.amp: expected one of"),
        ({**BASE, "data": {**BASE["data"], "hflip": "yes"}}, "data.hflip: expected true or false"),
        ({**BASE, "data": {**BASE["data"], "scale_range": [2.0, 1.0]}}, "data.scale_range"),
        (
            {**BASE, "data": {**BASE["data"], "scale_range": [1.0]}},
            "data.scale_range: expected 2 values",
        ),
        ({**BASE, "model": "deeplab"}, "model: expected a mapping"),
        ({"data": {"labeled": "x"}}, "data.root is required"),
        ({**BASE, "train": {"iterations": 0}}, "train.iterations must be positive"),
        ({**BASE, "scheme": {"cutmix_side": [0.5, 0.25]}}, "scheme.cutmix_side must be [lo, hi]"),
        ({**BASE, "scheme": {"cutmix_boxes": 0}}, "scheme.cutmix_boxes must be at least 1"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(data)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        config_from_dict(BASE, ["optim.lrr=0.1"])


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    cfg = config_from_dict(BASE, ["eval.tail_classes=[2,6]"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_shipped_presets_are_valid():
    configs = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(configs.glob("*.yaml"))
    assert files, "no presets in configs/"
    for path in files:
        load_config(path)


def test_quickstart_preset_file_matches_the_built_in_quickstart():
    from semiseg.quickstart import quickstart_config

    preset = (
        Path(__file__).resolve().parents[1]
        / "configs"
        / "supervised_deeplabv3plus-effl0_synthetic-1_8_quickstart.yaml"
    )
    assert load_config(preset) == config_from_dict(quickstart_config(Path("semiseg-quickstart")))


def test_base_file_is_merged_underneath(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({**BASE, "optim": {"lr": 0.5, "momentum": 0.8}})
    )
    (tmp_path / "child.yaml").write_text(
        yaml.safe_dump({"base": "base.yaml", "optim": {"lr": 0.1}})
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.8 and cfg.data.root == "data"
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"base": "loop.yaml"}))
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text(yaml.safe_dump({"base": "missing.yaml"}))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path):
    import os

    from semiseg.files import atomic_write_text

    target = tmp_path / "f.txt"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "x"
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".f.txt.*"))


def test_fpl_under_a_threshold_above_t_warns():
    raw = {
        **BASE,
        "policy": {"name": "threshold", "threshold": 0.95},
        "loss": {"name": "fpl", "T": 0.9},
    }
    with pytest.warns(UserWarning, match="K = 1"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="loss.T must be in"):
        config_from_dict({**BASE, "loss": {"name": "fpl", "T": 1.5}})
