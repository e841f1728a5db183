"""Every scheme x policy x unlabeled loss trains, or is refused at config load with the reason;
and a policy, a loss or a scheme defined here, registered in one line, trains like a built-in one."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_config
from torch import Tensor

from semiseg.components import combination_refusal, combinations
from semiseg.config import ConfigError, config_from_dict
from semiseg.losses import cross_entropy
from semiseg.metrics_log import read_metrics
from semiseg.pseudo import LOSSES, POLICIES, Policy, PolicyOptions, PseudoLabels
from semiseg.pseudo.unlabeled_loss import LossOptions, UnlabeledLoss
from semiseg.schemes import SCHEMES, StepOutput, Views
from semiseg.schemes.semi import SemiOptions, SemiScheme
from semiseg.training import train

DETECTOR_CLASSES = [1, 2, 4]

# Options that keep a two-step run small, or give it something to learn from at once: the
# tiny model's confidences sit near 1/C, so 0.95 would keep no pixel.
SCHEME_OPTIONS = {
    "stpg": {"match_after": 1, "anchor_steps": 20, "bank_topk": 8, "phi": 0.0},
    "self_training": {"alpha": [0.3]},
}
POLICY_OPTIONS = {
    "threshold": {"threshold": 0.2},
    "rankweight": {"threshold": 0.0, "reliable_threshold": 0.0},
}


@pytest.fixture(scope="module")
def detector_dir(synthetic_root, tmp_path_factory):
    """Cached detections for the 16 synthetic unlabeled images: one box per detector class."""
    folder = tmp_path_factory.mktemp("detector")
    (folder / "detections").mkdir()
    for i in range(16):
        boxes = [[4 * k, 2 * k, 4 * k + 30, 2 * k + 24] for k in range(len(DETECTOR_CLASSES))]
        record = {"image": "", "boxes": boxes, "classes": DETECTOR_CLASSES, "scores": [0.99] * 3}
        (folder / "detections" / f"{i:06d}.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def small_val(synthetic_root):
    """Two of the eight validation images: the matrix trains many runs, each evaluated once."""
    lines = (synthetic_root / "data" / "splits" / "val.txt").read_text().splitlines()[:2]
    path = synthetic_root / "val2.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def combination_config(root, out, scheme, policy, loss, detector_dir, val) -> dict:
    raw = tiny_config(
        root,
        out,
        scheme={"name": scheme, **SCHEME_OPTIONS.get(scheme, {})},
        train={"iterations": 2, "eval_every": 2, "log_every": 1, "threads": 1},
    )
    raw["data"]["val"] = str(val)
    if policy is not None:
        raw["policy"] = {"name": policy, **POLICY_OPTIONS.get(policy, {})}
        if policy == "rankweight":
            raw["policy"]["detector"] = {"classes": DETECTOR_CLASSES, "dir": str(detector_dir)}
    if loss is not None:
        raw["loss"] = {"name": loss}
    return raw


def train_and_check(raw: dict, out) -> list[dict]:
    result = train(config_from_dict(raw), progress=False)
    assert result["iteration"] == 2 and result["final"] is not None
    folder = out / result["metrics_dir"]
    records = [r for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train"]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    return records


MATRIX = combinations()


@pytest.mark.filterwarnings("ignore:policy.threshold")
@pytest.mark.parametrize("combo", MATRIX, ids=[f"{c.scheme}-{c.policy}-{c.loss}" for c in MATRIX])
def test_every_combination_trains_or_is_refused_at_load(
    combo, synthetic_root, tmp_path, detector_dir, small_val
):
    raw = combination_config(
        synthetic_root,
        tmp_path / "run",
        combo.scheme,
        combo.policy,
        combo.loss,
        detector_dir,
        small_val,
    )
    if combo.refused is not None:
        with pytest.raises(ConfigError) as err:
            config_from_dict(raw)
        assert str(err.value) == combo.refused and combo.scheme in combo.refused
        return
    records = train_and_check(raw, tmp_path / "run")
    if SCHEMES.get(combo.scheme).teaches:
        # The policy and the loss were the ones asked for (or the defaults), and they taught.
        assert "mask_ratio" in records[-1]
        if combo.loss == "fpl":
            assert "fpl/mean_k" in records[-1]
        if combo.policy == "rankweight":
            assert (
                "policy/mean_rank_weight" in records[-1]
                and "policy/reliable_fraction" in records[-1]
            )


def test_the_refusals_are_exactly_policies_and_losses_of_schemes_without_online_pseudo_labels():
    refused = {(c.scheme, c.policy, c.loss) for c in MATRIX if c.refused is not None}
    expected = {
        (c.scheme, c.policy, c.loss)
        for c in MATRIX
        if not SCHEMES.get(c.scheme).teaches and (c.policy is not None or c.loss is not None)
    }
    assert refused == expected
    assert combination_refusal("supervised", None, "fpl") is not None


def test_the_readme_tables_are_generated_from_the_registries(capsys):
    from pathlib import Path

    from semiseg.cli import main
    from semiseg.components import markdown, readme_block

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_block(readme) == markdown(), "run `semiseg components --readme README.md`"
    assert main(["components"]) == 0
    printed = capsys.readouterr().out
    assert "rankweight" in printed and "takes no 'policy' section" in printed


# ------------------------------------------------- components defined by a user
@dataclass
class QuantileOptions(PolicyOptions):
    name: str = "quantile"
    keep: float = 0.5
    """Share of each batch's valid pixels kept: the most confident ones."""

    def validate(self) -> None:
        super().validate()
        self.probability("keep")


class QuantilePolicy(Policy):
    """Weight 1 on the `keep` most confident share of the batch's valid pixels."""

    name = "quantile"
    Options = QuantileOptions
    summary = "the most confident share `keep` of each batch's pixels"

    def __init__(self, num_classes: int, keep: float = 0.5, reduce=None):
        super().__init__(num_classes, reduce)
        self.keep = keep

    def _select(self, probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        confidence, target = probs.max(dim=1)
        cut = torch.quantile(confidence[valid], 1.0 - self.keep) if bool(valid.any()) else 1.0
        return confidence, target, (confidence >= cut).float()


@dataclass
class SymmetricOptions(LossOptions):
    name: str = "symmetric_ce"
    beta: float = 1.0


class SymmetricCrossEntropy(UnlabeledLoss):
    """CE + beta * reverse CE (the student's probability of the pseudo label, penalised)."""

    name = "symmetric_ce"
    Options = SymmetricOptions
    summary = "cross-entropy plus reverse cross-entropy"

    def __call__(self, logits: Tensor, pl: PseudoLabels, valid: Tensor) -> Tensor:
        log_p = logits.float().log_softmax(dim=1)
        target = pl.target.clamp(max=logits.shape[1] - 1)
        ce = -log_p.gather(1, target[:, None])[:, 0]
        reverse = 1.0 - log_p.exp().gather(1, target[:, None])[:, 0]
        per_pixel = ce + self.options.beta * reverse
        return (per_pixel * pl.weight * valid).sum() / valid.sum().clamp(min=1)


@dataclass
class WeakStrongOptions(SemiOptions):
    name: str = "weak_strong"


class WeakStrongScheme(SemiScheme):
    """FixMatch without CutMix: the weak view labels one strong view, no mix-source stream."""

    name = "weak_strong"
    Options = WeakStrongOptions
    summary = "the weak view labels a strong view (no CutMix)"
    views = Views(strong=1, boxes=0, mix=False)

    def training_step(self, labeled, unlabeled, mix, iteration):
        assert mix is None and "box1" not in unlabeled and "strong2" not in unlabeled
        model, teaching, u = self.models["student"], self.teaching, unlabeled
        n = labeled["image"].shape[0]
        out = model(torch.cat([labeled["image"], u["image"]]))
        teaching.observe(out.rows(slice(None, n)), labeled["mask"])
        pl, _ = teaching.label(out.rows(slice(n, None)), u)
        loss_u = teaching.loss(model(u["strong1"]).logits, pl, u["valid"])
        loss_x = cross_entropy(out.logits[:n], labeled["mask"])
        logs = {
            "loss_x": loss_x.detach(),
            "loss_u": loss_u.detach(),
            **teaching.diagnostics(pl, u["valid"], None),
        }
        return StepOutput(loss_x + loss_u, logs)


@pytest.fixture
def registered():
    """Register the three components above for one test, one line each."""
    POLICIES.add(QuantilePolicy)
    LOSSES.add(SymmetricCrossEntropy)
    SCHEMES.add(WeakStrongScheme)
    yield
    POLICIES.remove("quantile")
    LOSSES.remove("symmetric_ce")
    SCHEMES.remove("weak_strong")


def teaching_schemes() -> list[str]:
    return [name for name in SCHEMES.names() if SCHEMES.get(name).teaches]


def test_a_new_policy_registered_in_one_line_trains_under_every_scheme(
    registered, synthetic_root, tmp_path, detector_dir, small_val
):
    for scheme in teaching_schemes():
        raw = combination_config(
            synthetic_root, tmp_path / scheme, scheme, "quantile", "ce", detector_dir, small_val
        )
        raw["policy"]["keep"] = 0.3
        records = train_and_check(raw, tmp_path / scheme)
        # The quantile is over the batch and its CutMix source together: per batch, some
        # pixels are kept and some are not.
        assert all(0 < r["mask_ratio"] < 1 for r in records), scheme
    assert "weak_strong" in teaching_schemes()
    with pytest.raises(ConfigError, match="policy.keep must be in"):
        config_from_dict(
            combination_config(
                synthetic_root,
                tmp_path / "x",
                "fixmatch",
                "quantile",
                None,
                detector_dir,
                small_val,
            )
            | {"policy": {"name": "quantile", "keep": 2.0}}
        )
    with pytest.raises(ConfigError, match="takes no 'policy' section"):
        config_from_dict(
            combination_config(
                synthetic_root,
                tmp_path / "y",
                "supervised",
                "quantile",
                None,
                detector_dir,
                small_val,
            )
        )


def test_a_new_loss_and_a_new_scheme_train_with_the_built_in_components(
    registered, synthetic_root, tmp_path, detector_dir, small_val
):
    for scheme in ("unimatch", "cps", "weak_strong"):
        for policy in POLICIES.names():
            out = tmp_path / f"{scheme}-{policy}"
            raw = combination_config(
                synthetic_root, out, scheme, policy, "symmetric_ce", detector_dir, small_val
            )
            raw["loss"]["beta"] = 0.5
            train_and_check(raw, out)
    for loss in LOSSES.names():
        out = tmp_path / f"weak_strong-{loss}"
        train_and_check(
            combination_config(
                synthetic_root, out, "weak_strong", "threshold", loss, detector_dir, small_val
            ),
            out,
        )
