"""DARS and its baselines: in-memory generators on hand-made sets, and the streaming generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.data.formats import Sample, get_format
from semiseg.offline.label_set import GeneratorSpec, generate, labeled_class_counts
from semiseg.pseudo.dars import (
    ConfidenceHistogram,
    cbst_labels,
    class_ratio,
    da_labels,
    dars_labels,
    kl_divergence,
    st_labels,
    target_counts,
)


def counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels[labels != 255].flatten(), minlength=num_classes).tolist()


def tied_set() -> tuple[torch.Tensor, torch.Tensor]:
    """2 images of 10x10: class 0 ('road') on 150 pixels, 120 of them at exactly 1.0; class 1
    on 40 pixels with distinct confidences; class 2 on 10 pixels."""
    pred = torch.zeros(2, 10, 10, dtype=torch.long)
    conf = torch.ones(2, 10, 10)
    flat_pred, flat_conf = pred.view(-1), conf.view(-1)
    flat_conf[120:150] = torch.linspace(0.5, 0.9, 30)
    flat_pred[150:190] = 1
    flat_conf[150:190] = torch.linspace(0.4, 0.99, 40)
    flat_pred[190:] = 2
    flat_conf[190:] = torch.linspace(0.6, 0.95, 10)
    return conf, pred


def test_target_counts_follow_eq_4():
    ratio = torch.tensor([0.5, 0.3, 0.2])
    assert target_counts(ratio, 0.2, 200).tolist() == [20, 12, 8]
    assert class_ratio(torch.tensor([5, 3, 2])).tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_dars_hits_targets_exactly_under_ties_where_da_overfills():
    conf, pred = tied_set()
    ratio = torch.tensor([0.5, 0.3, 0.2])
    # n = [20, 12, 8]; class 0's 20th largest confidence is 1.0, shared by 120 pixels.
    da = da_labels(conf, pred, ratio, 0.2)
    assert counts(da, 3) == [120, 12, 8]
    dars = dars_labels(conf, pred, ratio, 0.2, torch.Generator().manual_seed(0))
    assert counts(dars, 3) == [20, 12, 8]
    # Sampling only removes pixels DA kept, and class 1 keeps exactly its 12 most confident.
    assert torch.all((dars == 255) | (dars == da))
    assert set(conf.view(-1)[(dars == 1).view(-1)].tolist()) == set(
        conf.view(-1)[150:190].topk(12).values.tolist()
    )
    assert kl_divergence(ratio, torch.tensor(counts(dars, 3))) == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(ratio, torch.tensor(counts(da, 3))) > 0.1


def test_kl_divergence_hand_computed_and_never_negative():
    reference = torch.tensor([0.5, 0.25, 0.25])
    # q = (0.25, 0.25, 0.5): 0.5 ln 2 + 0 + 0.25 ln 0.5.
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert kl_divergence(reference, torch.tensor([1, 1, 2])) == pytest.approx(expected, rel=1e-9)
    # Counts in exactly the reference's proportions: eps alone would make this -3e-12.
    assert kl_divergence(reference, torch.tensor([2_000_000, 1_000_000, 1_000_000])) == 0.0


def test_dars_never_predicted_class_and_scarce_class():
    conf, pred = tied_set()
    ratio = torch.tensor(
        [0.2, 0.2, 0.3, 0.3]
    )  # class 3 is never predicted; class 2 has 10 < 60 pixels
    labels = dars_labels(conf, pred, ratio, 1.0, torch.Generator().manual_seed(1))
    assert counts(labels, 4) == [40, 40, 10, 0]


def test_st_and_cbst_match_their_definitions():
    conf, pred = tied_set()
    # >= 0.9: the 120 ties and the top of linspace(0.5, 0.9); 6 of linspace(0.4, 0.99, 40)
    # (0.4 + 34 * 0.59 / 39 is the first >= 0.9); 2 of linspace(0.6, 0.95, 10).
    assert counts(st_labels(conf, pred, threshold=0.9), 3) == [121, 6, 2]
    # Top 10 % of 200 pixels: the 20th largest confidence is 1.0, so all 120 ties are kept.
    assert counts(st_labels(conf, pred, alpha=0.1), 3) == [120, 0, 0]
    # CBST at 0.5: int(0.5 * len_j) most confident of each class: 75 (ties: 120), 20, 5.
    assert counts(cbst_labels(conf, pred, 3, 0.5), 3) == [120, 20, 5]
    with pytest.raises(ValueError, match="exactly one"):
        st_labels(conf, pred)


def test_histogram_thresholds_equal_sorting():
    torch.manual_seed(0)
    conf = torch.rand(3, 16, 16).half().float()
    conf[0, :4] = 1.0
    pred = torch.randint(0, 4, (3, 16, 16))
    hist = ConfidenceHistogram(4)
    for i in range(3):  # streamed one image at a time
        hist.add(conf[i], pred[i])
    wanted = torch.tensor([50, 0, 1000, 7])
    thresholds, kept = hist.class_thresholds(wanted)
    for j in range(4):
        values = conf[pred == j]
        if wanted[j] == 0:
            assert thresholds[j] is None and kept[j] == 0
            continue
        expected = values.sort(descending=True).values[min(int(wanted[j]), values.numel()) - 1]
        assert thresholds[j] == float(expected)
        assert kept[j] == int((values >= expected).sum())


# ----------------------------------------------------------------- streaming generator
class FixedTeacher(torch.nn.Module):
    """Logits from the image: a strong 1x1 conv, so many pixels saturate at confidence 1.0."""

    def __init__(self, num_classes: int):
        super().__init__()
        # Seeded before the layer is built: its bias is drawn at construction, and every
        # instance must be the same teacher whatever ran before it.
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_classes, 1)
        torch.nn.init.normal_(self.conv.weight, std=20.0)

    def forward(self, x):
        from semiseg.models.segmentor import SegmentationOutput

        return SegmentationOutput(logits=self.conv(x), features=x)


@pytest.fixture()
def image_set(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, None))
    return samples


def run_generator(samples, out, spec, seed=0, labeled=None):
    fmt = get_format("folder", 3)
    labeled = torch.tensor([500, 300, 200]) if labeled is None else labeled
    return generate(
        FixedTeacher(3),
        samples,
        fmt,
        3,
        out,
        spec,
        labeled_counts=labeled,
        seed=seed,
        progress=False,
        keep_cache=True,
    )


def read_labels(out) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in sorted((out / "labels").glob("*.png"))]


def test_streaming_dars_gives_exact_targets_and_matches_in_memory_counts(image_set, tmp_path):
    stats = run_generator(image_set, tmp_path / "dars", GeneratorSpec("dars", alpha=0.3))
    assert stats["final"] == [
        min(t, p) for t, p in zip(stats["targets"], stats["predicted"], strict=True)
    ]
    assert stats["kl_final"] < 1e-3
    labels = read_labels(tmp_path / "dars")
    assert len(labels) == 6 and {v for a in labels for v in np.unique(a)} <= {0, 1, 2, 255}
    # The in-memory reference on the same cached predictions keeps the same number per class.
    caches = [np.load(p) for p in sorted((tmp_path / "dars" / "cache").glob("*.npz"))]
    conf = torch.from_numpy(np.stack([c["conf"] for c in caches])).float()
    pred = torch.from_numpy(np.stack([c["pred"] for c in caches])).long()
    reference = dars_labels(
        conf, pred, torch.tensor(stats["labeled_ratio"]), 0.3, torch.Generator().manual_seed(0)
    )
    assert counts(reference, 3) == stats["final"]
    assert (tmp_path / "dars" / "list.txt").read_text().count("\n") == 6


def test_streaming_da_overfills_and_st_cbst_follow_their_definitions(image_set, tmp_path):
    da = run_generator(image_set, tmp_path / "da", GeneratorSpec("da", alpha=0.3))
    assert da["final"] == da["thresholded"]
    assert any(k > t for k, t in zip(da["final"], da["targets"], strict=True))  # ties at 1.0
    st = run_generator(image_set, tmp_path / "st", GeneratorSpec("st", alpha=None, threshold=0.99))
    caches = [np.load(p) for p in sorted((tmp_path / "st" / "cache").glob("*.npz"))]
    conf = torch.from_numpy(np.stack([c["conf"] for c in caches])).float()
    pred = torch.from_numpy(np.stack([c["pred"] for c in caches])).long()
    assert st["final"] == counts(
        st_labels(conf, pred, threshold=float(torch.tensor(0.99).half())), 3
    )
    cbst = run_generator(image_set, tmp_path / "cbst", GeneratorSpec("cbst", alpha=0.4))
    assert cbst["final"] == counts(cbst_labels(conf, pred, 3, 0.4), 3)


def test_generation_is_deterministic_and_resumes_after_a_kill(image_set, tmp_path, monkeypatch):
    spec = GeneratorSpec("dars", alpha=0.3)
    run_generator(image_set, tmp_path / "a", spec, seed=5)
    import semiseg.offline.label_set as pseudolabel

    original = pseudolabel.atomic_write
    written = []

    def dying(path, write):
        if path.suffix == ".png" and len(written) == 3:
            raise KeyboardInterrupt
        original(path, write)
        if path.suffix == ".png":
            written.append(path)

    monkeypatch.setattr(pseudolabel, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        run_generator(image_set, tmp_path / "b", spec, seed=5)
    monkeypatch.setattr(pseudolabel, "atomic_write", original)
    assert len(list((tmp_path / "b" / "labels").glob("*.png"))) == 3
    assert not (tmp_path / "b" / "stats.json").exists()
    stats = run_generator(image_set, tmp_path / "b", spec, seed=5)
    a, b = read_labels(tmp_path / "a"), read_labels(tmp_path / "b")
    assert len(b) == 6 and not list((tmp_path / "b" / "labels").glob(".*tmp"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["final"] == stats["final"]
    other = run_generator(image_set, tmp_path / "c", spec, seed=6)
    assert other["final"] == stats["final"]
    assert not all(
        np.array_equal(x, y) for x, y in zip(a, read_labels(tmp_path / "c"), strict=True)
    )


def test_labeled_class_counts_skip_ignore(tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1, 255], [1, 1, 2]], dtype=np.uint8)).save(mask)
    fmt = get_format("folder", 3)
    assert labeled_class_counts([Sample(mask, mask)], fmt, 3, progress=False).tolist() == [1, 3, 1]


# --------------------------------------------------------------- self-training rounds
def self_training_config(synthetic_root, out, **train):
    from conftest import tiny_config

    from semiseg.config import config_from_dict

    return config_from_dict(
        tiny_config(
            synthetic_root,
            out,
            scheme={
                "name": "self_training",
                "method": "dars",
                "alpha": [0.2, 0.5],
                "beta_min": [0.0, 0.2],
                "beta_max": [0.0, 0.5],
            },
            train={
                "iterations": 2,
                "eval_every": 2,
                "log_every": 1,
                "checkpoint_every": 1,
                **train,
            },
        )
    )


def test_self_training_runs_every_round_and_resumes_after_a_kill(
    synthetic_root, tmp_path, monkeypatch
):
    from semiseg.checkpoint import load_checkpoint
    from semiseg.engine import Trainer
    from semiseg.training import train

    reference = train(self_training_config(synthetic_root, tmp_path / "ref"), progress=False)
    assert [r["round"] for r in reference["rounds"]] == [0, 1, 2]
    assert reference["rounds"][2]["scale_range"] == pytest.approx([0.75 * 0.8, 1.25 * 1.5])
    for k in (1, 2):
        stats = json.loads((tmp_path / "ref" / f"round{k}" / "pseudo" / "stats.json").read_text())
        assert stats["final"] == [
            min(t, p) for t, p in zip(stats["targets"], stats["predicted"], strict=True)
        ]
        assert stats["generator"]["alpha"] == [0.2, 0.5][k - 1]
    assert load_checkpoint(tmp_path / "ref" / "round2" / "latest.pt")["config"]["model"][
        "init_from"
    ].endswith("round1/latest.pt")

    # Die at the second step of round 2 (steps: round 0: 2, round 1: 2, round 2: 1 done).
    calls = []
    original = Trainer._set_lr

    def dying(self, iteration):
        calls.append(iteration)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, iteration)

    monkeypatch.setattr(Trainer, "_set_lr", dying)
    with pytest.raises(KeyboardInterrupt):
        train(self_training_config(synthetic_root, tmp_path / "killed"), progress=False)
    monkeypatch.setattr(Trainer, "_set_lr", original)
    assert not (tmp_path / "killed" / "final.json").exists()
    resumed = train(self_training_config(synthetic_root, tmp_path / "killed"), progress=False)
    assert [r["kl_final"] for r in resumed["rounds"][1:]] == [
        r["kl_final"] for r in reference["rounds"][1:]
    ]
    a = load_checkpoint(tmp_path / "ref" / "round2" / "latest.pt")["models"]["student"]
    b = load_checkpoint(tmp_path / "killed" / "round2" / "latest.pt")["models"]["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_restart_labels_every_round_again_with_its_new_teacher(synthetic_root, tmp_path):
    from semiseg.training import train

    cfg = self_training_config(synthetic_root, tmp_path / "st")
    train(cfg, progress=False)
    labels = sorted((tmp_path / "st" / "round1" / "pseudo" / "labels").glob("*.png"))
    original = labels[0].read_bytes()
    # Stand-in for the labels of an earlier, different teacher.
    shape = np.array(Image.open(labels[0])).shape
    Image.fromarray(np.full(shape, 255, dtype=np.uint8)).save(labels[0])
    train(cfg, restart=True, progress=False)
    # Round 0 was trained again (to the same weights) and labelled the set again.
    assert labels[0].read_bytes() == original


def test_pseudo_label_cli_prints_the_class_table(synthetic_root, tmp_path, capsys):
    from conftest import tiny_config

    from semiseg.cli import main
    from semiseg.config import config_from_dict
    from semiseg.training import train

    train(
        config_from_dict(
            tiny_config(
                synthetic_root, tmp_path / "teacher", train={"iterations": 2, "eval_every": 2}
            )
        ),
        progress=False,
    )
    out = tmp_path / "pl"
    assert (
        main(
            [
                "pseudo-label",
                str(tmp_path / "teacher" / "latest.pt"),
                str(out),
                "--alpha",
                "0.3",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "KL(labeled || pseudo)" in printed and "list.txt" in printed
    assert (out / "stats.json").is_file() and len(list((out / "labels").glob("*.png"))) == 16
    assert (
        main(
            [
                "pseudo-label",
                str(tmp_path / "teacher" / "latest.pt"),
                str(tmp_path / "x"),
                "--alpha",
                "2",
            ]
        )
        == 2
    )
    assert "alpha must be in [0, 1]" in capsys.readouterr().err


def test_official_variant_cbst_keeps_one_more_and_dars_samples_per_image(image_set, tmp_path):
    official = run_generator(
        image_set, tmp_path / "cbst_off", GeneratorSpec("cbst", alpha=0.4, variant="official")
    )
    caches = [np.load(p) for p in sorted((tmp_path / "cbst_off" / "cache").glob("*.npz"))]
    conf = torch.from_numpy(np.stack([c["conf"] for c in caches])).float()
    pred = torch.from_numpy(np.stack([c["pred"] for c in caches])).long()
    for j in range(3):
        values = conf[pred == j].sort(descending=True).values
        # The int(alpha * len_j) + 1-th largest confidence (0-based index int(alpha * len_j)).
        t = values[min(int(0.4 * values.numel()), values.numel() - 1)]
        assert official["thresholded"][j] == int((values >= t).sum())
    dars = run_generator(
        image_set, tmp_path / "dars_off", GeneratorSpec("dars", alpha=0.3, variant="official")
    )
    for final, target, kept in zip(
        dars["final"], dars["targets"], dars["thresholded"], strict=True
    ):
        # Per-image sampling: the total can exceed n_j by up to one pixel per image.
        assert min(target, kept) <= final <= min(target, kept) + len(image_set)
