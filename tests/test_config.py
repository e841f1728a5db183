import re
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


def test_off_is_the_word_in_a_choice_not_a_boolean():
    assert config_from_dict(BASE, ["train.amp=off"]).train.amp == "off"
    assert config_from_dict({**BASE, "train": {"amp": False}}).train.amp == "off"
    with pytest.raises(ConfigError, match="train.channels_last: expected true or false"):
        config_from_dict(BASE, ["train.channels_last=fast"])


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
        (
            {**BASE, "scheme": {"name": "fixmatch", "cutmix_side": [0.5, 0.25]}},
            "scheme.cutmix_side must be [lo, hi]",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch", "cutmix_boxes": 0}},
            "scheme.cutmix_boxes must be at least 1",
        ),
        (
            {**BASE, "scheme": {"name": "unimatch"}, "policy": {"name": "daw", "k": 3}},
            "policy.k is not an option of policy 'daw'; it is an option of policy 'rankweight'",
        ),
        (
            {**BASE, "scheme": {"name": "unimatch", "selection": "all"}},
            "scheme.selection is not an option of scheme 'unimatch'; it is an option of scheme 'stpg'",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "loss": {"name": "ce", "T": 0.9}},
            "loss.T is not an option of loss 'ce'; it is an option of loss 'fpl'",
        ),
        (
            {**BASE, "scheme": {"name": "stpg"}, "stpg": {"selection": "all"}},
            "the top-level section 'stpg' is gone",
        ),
        ({**BASE, "detector": {"classes": [1]}}, "the detector belongs to policy 'rankweight'"),
        (
            {**BASE, "policy": {"name": "daw"}},
            "scheme 'supervised' learns from no online pseudo labels, so it takes no 'policy' section",
        ),
        (
            {**BASE, "scheme": {"name": "self_training"}, "loss": {"name": "fpl"}},
            "scheme 'self_training' learns from no online pseudo labels, so it takes no 'loss' section",
        ),
        (
            {**BASE, "scheme": {"name": "mean_teacher", "ema_decay": 0.99}},
            "scheme.ema_decay is not an option of scheme 'mean_teacher'",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "policy": {"name": "bogus"}},
            "policy.name: unknown policy 'bogus'; available: pseudo_label, threshold",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "policy": {"name": "threshold", "warmup": 5}},
            "policy.warmup=5: the warm-up feeds a stateful policy's statistics",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "policy": {"name": "rankweight"}},
            "policy.rppi needs the detector's classes",
        ),
        (
            {
                **BASE,
                "scheme": {"name": "fixmatch"},
                "policy": {
                    "name": "rankweight",
                    "rppi": False,
                    "detector": {"score_threshold": 2.0},
                },
            },
            "policy.detector.score_threshold must be in [0, 1]",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "policy": {"name": "daw", "momentum": 1.0}},
            "policy.momentum must be in [0, 1)",
        ),
        (
            {**BASE, "scheme": {"name": "self_training", "alpha": [0.2, 0.5]}},
            "scheme.alpha needs one value per round, as beta_min and beta_max do",
        ),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data)


@pytest.mark.parametrize(
    "data, message, suggestion",
    [
        (
            {**BASE, "data": {**BASE["data"], "crop_sise": 100}},
            "unknown key 'data.crop_sise'",
            "crop_size",
        ),
        ({**BASE, "train": {"amp": "bf61"}}, "train.amp: expected one of", "bf16"),
        (
            {**BASE, "scheme": {"name": "fixmatch"}, "policy": {"name": "treshold"}},
            "policy.name: unknown policy 'treshold'; available:",
            "threshold",
        ),
        (
            {**BASE, "scheme": {"name": "fixmatch", "cutmix_pp": 0.5}},
            "scheme.cutmix_pp is not an option of scheme 'fixmatch'",
            "cutmix_p",
        ),
    ],
)
def test_a_likely_typo_gets_a_suggestion(data, message, suggestion):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        config_from_dict(data)
    assert re.findall(r"did you mean '(\w+)'\?", str(error.value)) == [suggestion]


def test_no_suggestion_for_a_word_unlike_any_choice():
    with pytest.raises(ConfigError) as error:
        config_from_dict({**BASE, "optim": {"learning_rate": 0.1}})
    assert "did you mean" not in str(error.value)


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
    semi = {**BASE, "scheme": {"name": "fixmatch"}}
    raw = {
        **semi,
        "policy": {"name": "threshold", "threshold": 0.95},
        "loss": {"name": "fpl", "T": 0.9},
    }
    with pytest.warns(UserWarning, match="K = 1"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="loss.T must be in"):
        config_from_dict({**semi, "loss": {"name": "fpl", "T": 1.5}})


def test_each_section_holds_only_its_components_options():
    from semiseg.pseudo.daw import DAWOptions
    from semiseg.schemes.stpg import STPGOptions

    cfg = config_from_dict(
        {
            **BASE,
            "scheme": {"name": "stpg", "selection": "all"},
            "policy": {"name": "daw", "align": False},
        }
    )
    assert isinstance(cfg.scheme, STPGOptions) and cfg.scheme.selection == "all"
    assert isinstance(cfg.policy, DAWOptions) and not cfg.policy.align and cfg.loss.name == "ce"
    supervised = config_from_dict(BASE)
    assert supervised.policy is None and supervised.loss is None
    # A semi-supervised scheme without the sections gets the default policy and loss.
    default = config_from_dict({**BASE, "scheme": {"name": "fixmatch"}})
    assert (default.policy.name, default.policy.threshold, default.loss.name) == (
        "threshold",
        0.95,
        "ce",
    )


def test_changing_a_components_name_starts_its_section_afresh(tmp_path: Path):
    semi = {**BASE, "scheme": {"name": "unimatch"}}
    (tmp_path / "rank.yaml").write_text(
        yaml.safe_dump({**semi, "policy": {"name": "rankweight", "k": 3, "rppi": False}})
    )
    (tmp_path / "child.yaml").write_text(
        yaml.safe_dump({"base": "rank.yaml", "policy": {"bank_size": 64}})
    )
    child = load_config(tmp_path / "child.yaml")
    assert (child.policy.k, child.policy.bank_size) == (3, 64)
    # policy.k belongs to rankweight: renaming the policy drops it instead of failing on it.
    daw = load_config(tmp_path / "child.yaml", ["policy.name=daw", "policy.align=false"])
    assert daw.policy.name == "daw" and not daw.policy.align
    # The same name keeps the section: an option it lacks is still an error.
    with pytest.raises(ConfigError, match="policy.align is not an option of policy 'rankweight'"):
        load_config(tmp_path / "child.yaml", ["policy.name=rankweight", "policy.align=false"])


def test_a_saved_config_of_the_old_layout_still_loads():
    from semiseg.config import config_from_saved

    old = {
        **BASE,
        "scheme": {
            "name": "stpg",
            "ema_decay": 0.0,
            "aux_weight": 0.4,
            "unsup_weight": 1.0,
            "teacher_decay": 0.9,
            "cutmix_p": 1.0,
        },
        "policy": {
            "name": "rankweight",
            "threshold": 0.9,
            "power": 2.0,
            "momentum": 0.99,
            "k": 4,
            "warmup": 0,
        },
        "loss": {"name": "ce", "T": 0.9, "A": 50.0},
        "selftrain": {"method": "dars", "alpha": [0.2]},
        "detector": {"classes": [1, 2], "dir": "det"},
        "stpg": {"selection": "cons", "match_after": 7},
    }
    cfg = config_from_saved(old)
    assert (cfg.scheme.selection, cfg.scheme.match_after, cfg.scheme.teacher_decay) == (
        "cons",
        7,
        0.9,
    )
    assert cfg.policy.k == 4 and cfg.policy.detector.classes == [1, 2] and cfg.loss.name == "ce"
    supervised = config_from_saved({**old, "scheme": {"name": "supervised", "unsup_weight": 1.0}})
    assert supervised.policy is None and supervised.loss is None
