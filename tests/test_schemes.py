"""Semi-supervised schemes on the one engine: each trains, logs its diagnostics and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import crash_at, tiny_config

from semiseg.checkpoint import load_checkpoint
from semiseg.cli import main
from semiseg.config import config_from_dict
from semiseg.engine import Trainer
from semiseg.metrics_log import read_metrics
from semiseg.pseudo import PseudoLabels
from semiseg.run_folder import RunFolder, read_snapshots
from semiseg.schemes.semi import SemiScheme, oracle_diagnostics, paste
from semiseg.training import train

SEMI = ["fixmatch", "unimatch", "mean_teacher", "cps"]


def test_paste_takes_the_source_inside_the_box():
    base, source = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    box = torch.zeros(1, 3, 3, dtype=torch.bool)
    box[0, 1:, :2] = True
    out = paste(base, source, box)
    assert torch.equal(out[0, 0], box[0].float()) and torch.equal(out[0, 1], box[0].float())
    assert torch.equal(paste(base[:, 0], source[:, 0], box), box.float())


def test_eval_prediction_uses_running_statistics_and_leaves_them_and_train_mode_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), torch.nn.BatchNorm2d(1))
    torch.nn.init.ones_(model[0].weight)
    model[1].running_mean.fill_(2.0)
    model[1].running_var.fill_(4.0 - model[1].eps)
    model.train()
    out = SemiScheme.eval_prediction(model, torch.full((2, 1, 2, 2), 6.0))
    # (6 - 2) / sqrt(4) with the running statistics; a train-mode pass would give 0.
    assert torch.allclose(out, torch.full_like(out, 2.0))
    assert model.training and model[1].training
    assert float(model[1].running_mean) == 2.0 and int(model[1].num_batches_tracked) == 0
    assert not out.requires_grad


def test_oracle_diagnostics_on_a_hand_made_batch():
    # Pixels: right w=1, right w=0.5, wrong w=0.25, wrong w=0 (discarded), right w=0
    # (discarded), an ignored truth, and an invalid (padding) pixel.
    target = torch.tensor([[[1, 2, 0, 1, 3, 1, 1]]])
    truth = torch.tensor([[[1, 2, 1, 0, 3, 255, 0]]])
    weight = torch.tensor([[[1.0, 0.5, 0.25, 0.0, 0.0, 1.0, 1.0]]])
    valid = torch.tensor([[[True] * 6 + [False]]])
    logs = oracle_diagnostics(PseudoLabels(target, weight, torch.ones_like(weight)), valid, truth)
    assert float(logs["oracle/acc_used"]) == pytest.approx(2 / 3)
    assert float(logs["oracle/acc_discarded"]) == pytest.approx(1 / 2)
    assert float(logs["oracle/acc_weighted"]) == pytest.approx(1.5 / 1.75)
    assert float(logs["oracle/weight_correct"]) == pytest.approx(0.75)
    assert float(logs["oracle/weight_wrong"]) == pytest.approx(0.25)
    nothing_used = oracle_diagnostics(
        PseudoLabels(target, torch.zeros_like(weight), weight), valid, truth
    )
    assert math.isnan(nothing_used["oracle/acc_used"]) and math.isnan(
        nothing_used["oracle/acc_weighted"]
    )


@pytest.mark.parametrize("scheme", SEMI)
def test_scheme_trains_and_logs_pseudo_label_diagnostics(synthetic_root, tmp_path, scheme):
    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            scheme={"name": scheme, "oracle_eval": True},
            policy={"name": "threshold", "threshold": 0.5},
            train={"iterations": 4, "eval_every": 4, "log_every": 2},
        )
    )
    result = train(cfg, progress=False)
    assert result["iteration"] == 4
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in records)
    for key in ("mask_ratio", "mean_weight", "loss_x" if scheme != "cps" else "loss_x_student"):
        assert key in records[-1], key
    assert 0 <= records[-1]["mask_ratio"] <= 1
    assert any("oracle/acc_used" in r or "oracle/acc_discarded" in r for r in records)


def test_semi_scheme_without_unlabeled_list_is_an_error(synthetic_root, tmp_path):
    from semiseg.data.formats import DataError

    raw = tiny_config(synthetic_root, tmp_path / "run", scheme={"name": "fixmatch"})
    raw["data"]["unlabeled"] = None
    with pytest.raises(DataError, match="data.unlabeled"):
        Trainer(config_from_dict(raw), progress=False)


@pytest.mark.parametrize("warmup", [0, 3])
def test_unimatch_daw_resumes_exactly_with_policy_state(
    synthetic_root, tmp_path, monkeypatch, warmup
):
    overrides = {
        "scheme": {"name": "unimatch"},
        "policy": {"name": "daw", "warmup": warmup},
        "train": {"iterations": 6, "eval_every": 6, "checkpoint_every": 3, "log_every": 3},
    }
    reference = tmp_path / "reference"
    train(config_from_dict(tiny_config(synthetic_root, reference, **overrides)), progress=False)

    killed = tmp_path / "killed"
    cfg = config_from_dict(tiny_config(synthetic_root, killed, **overrides))
    crash_at(cfg, 4, monkeypatch)
    train(cfg, progress=False)

    a, b = load_checkpoint(reference / "latest.pt"), load_checkpoint(killed / "latest.pt")
    for key, tensor in a["models"]["student"].items():
        assert torch.equal(tensor, b["models"]["student"][key]), key
    pa, pb = a["scheme"]["policy"], b["scheme"]["policy"]
    assert pa.keys() == pb.keys()
    for key in pa:
        va, vb = pa[key], pb[key]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, key
    records = [r for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"]
    assert "policy/t" in records[-1]


@pytest.mark.parametrize("scheme", SEMI)
def test_fpl_loss_trains_every_scheme_and_logs_k_and_gradient_scores(
    synthetic_root, tmp_path, scheme
):
    cfg = config_from_dict(
        tiny_config(
            synthetic_root,
            tmp_path / "run",
            scheme={"name": scheme, "oracle_eval": True},
            policy={"name": "pseudo_label"},
            loss={"name": "fpl", "T": 0.9},
            train={"iterations": 2, "eval_every": 2, "log_every": 1},
        )
    )
    train(cfg, progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    last = records[-1]
    assert math.isfinite(last["loss"])
    shares = [last[k] for k in ("fpl/k1", "fpl/k2", "fpl/k3", "fpl/k4+")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert last["fpl/mean_k"] >= 1
    assert sum(last.get(f"fpl/case{c}_share", 0.0) for c in (1, 2, 3)) == pytest.approx(
        1.0, abs=1e-4
    )
    assert 0 <= last["fpl/R_case1"] <= 1 + 1e-6

    snapshots = read_snapshots(RunFolder(tmp_path / "run").snapshots("fpl_kmaps"))
    assert [s["iteration"] for s in snapshots] == [2]
    assert (
        snapshots[0]["k"].shape == snapshots[0]["images"].shape[:3] and snapshots[0]["k"].min() >= 1
    )
    assert main(["plot", str(tmp_path / "run")]) == 0
    for name in ("fpl_k_histogram.png", "fpl_k_maps.png", "fpl_gradient_scores.png"):
        assert (tmp_path / "run" / "plots" / name).is_file(), name


@pytest.mark.filterwarnings("ignore:policy.threshold")  # T = 0 is below any threshold, on purpose
def test_fpl_with_one_class_sets_and_no_adaptive_weight_is_the_cross_entropy_step(
    synthetic_root, tmp_path
):
    """T = 0 makes every set the pseudo label alone (K = 1), so FPL reduces to Eq. 9 = CE."""

    def first_loss(loss_cfg: dict, name: str) -> float:
        cfg = config_from_dict(
            tiny_config(
                synthetic_root,
                tmp_path / name,
                scheme={"name": "fixmatch"},
                policy={"name": "threshold", "threshold": 0.3},
                loss=loss_cfg,
                train={"iterations": 1, "eval_every": 1, "log_every": 1},
            )
        )
        train(cfg, progress=False)
        return next(
            r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"
        )["loss_s"]

    ce = first_loss({"name": "ce"}, "ce")
    fpl = first_loss({"name": "fpl", "T": 0.0, "adaptive_weight": "none"}, "fpl")
    assert fpl == pytest.approx(ce, rel=1e-5)
    # The official CPS rescaling keeps FPL's gradient direction but reports the CE value.
    rescaled = first_loss(
        {"name": "fpl", "T": 0.95, "adaptive_weight": "none", "rescale": "each"}, "rescaled"
    )
    assert rescaled == pytest.approx(ce, rel=1e-5)
    assert first_loss(
        {"name": "fpl", "T": 0.95, "adaptive_weight": "none"}, "plain"
    ) != pytest.approx(ce, rel=1e-3)


def test_policy_warm_up_feeds_statistics_before_the_first_step(synthetic_root, tmp_path):
    def first_window(name: str, warmup: int) -> dict:
        cfg = config_from_dict(
            tiny_config(
                synthetic_root,
                tmp_path / name,
                scheme={"name": "fixmatch"},
                policy={"name": "daw", "warmup": warmup},
                train={"iterations": 1, "eval_every": 1, "log_every": 1},
            )
        )
        train(cfg, progress=False)
        return next(
            r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"
        )

    cold, warm = first_window("cold", 0), first_window("warm", 20)
    # Twenty more EMA updates (m = 0.99) pull the fits away from the initial N(1/C, 1).
    assert abs(warm["policy/sigma_pos"] - 1.0) > abs(cold["policy/sigma_pos"] - 1.0)


@pytest.mark.parametrize("scheme", ["fixmatch", "unimatch"])
def test_loss_scale_multiplies_the_whole_loss(synthetic_root, tmp_path, scheme):
    """0.5 is UniMatch's (L_x + L_u) / 2; 1.0 the FixMatch and DAW papers' L_x + L_u."""

    def first_step(scale: float) -> dict:
        name = f"{scheme}-{scale}"
        cfg = config_from_dict(
            tiny_config(
                synthetic_root,
                tmp_path / name,
                scheme={"name": scheme, "loss_scale": scale},
                policy={"name": "threshold", "threshold": 0.3},
                train={"iterations": 1, "eval_every": 1, "log_every": 1},
            )
        )
        train(cfg, progress=False)
        return next(
            r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"
        )

    half, whole = first_step(0.5), first_step(1.0)
    assert half["loss_x"] == whole["loss_x"]
    assert whole["loss"] == pytest.approx(2 * half["loss"], rel=1e-6)
    terms = (
        ("loss_x", "loss_s")
        if scheme == "fixmatch"
        else ("loss_x", "loss_s1", "loss_s2", "loss_fp")
    )
    weights = {"loss_x": 1.0, "loss_s": 1.0, "loss_s1": 0.25, "loss_s2": 0.25, "loss_fp": 0.5}
    assert whole["loss"] == pytest.approx(sum(weights[t] * whole[t] for t in terms), rel=1e-5)
