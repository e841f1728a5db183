"""The pieces of the paper-scale recipes (docs/recipes.md) on hand-computed cases: OHEM, the
released rank-weighting normalisation, FPL's rescaling, CPS's CutMix, the CutMix source,
epoch schedules and DARS' augmentation; then every paper-scale preset against the table."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from semiseg.losses import LABELED_LOSSES, OHEMOptions, cross_entropy, ohem_cross_entropy


def true_class_logits(p: list[float]) -> torch.Tensor:
    """Two-class logits [1,2,1,N] whose softmax gives class 0 the probabilities `p`."""
    p_t = torch.tensor(p, dtype=torch.float64)
    return torch.stack([p_t.log(), (1 - p_t).log()]).reshape(1, 2, 1, -1).float()


def mean_nll(p: list[float]) -> float:
    return sum(-math.log(v) for v in p) / len(p)


def test_ohem_keeps_pixels_below_the_threshold():
    logits = true_class_logits([0.9, 0.6, 0.3, 0.8])
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    # min_kept 1: the cut is max(0.7, 0.3) = 0.7, so 0.6 and 0.3 are kept.
    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=1)
    assert float(loss) == pytest.approx(mean_nll([0.6, 0.3]), rel=1e-5)


def test_ohem_keeps_min_kept_hardest_pixels_when_few_pass_the_threshold():
    logits = true_class_logits([0.9, 0.6, 0.3, 0.8])
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    # min_kept 3: the third smallest probability, 0.8, raises the cut above 0.7.
    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=3)
    assert float(loss) == pytest.approx(mean_nll([0.6, 0.3, 0.8]), rel=1e-5)
    # threshold 0.1: nothing passes, the two hardest are kept.
    loss = ohem_cross_entropy(logits, target, threshold=0.1, min_kept=2)
    assert float(loss) == pytest.approx(mean_nll([0.6, 0.3]), rel=1e-5)


def test_ohem_never_keeps_ignored_pixels_and_keeps_all_when_few_are_valid():
    logits = true_class_logits([0.9, 0.6, 0.3, 0.8, 0.1])
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    # The ignored pixel (p 0.1, the hardest) neither counts nor is kept.
    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=1)
    assert float(loss) == pytest.approx(mean_nll([0.6, 0.3]), rel=1e-5)
    # 4 valid pixels <= min_kept 4: all of them, the plain cross-entropy.
    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=4)
    assert float(loss) == pytest.approx(float(cross_entropy(logits, target)), rel=1e-6)
    assert float(loss) == pytest.approx(mean_nll([0.9, 0.6, 0.3, 0.8]), rel=1e-5)
    empty = ohem_cross_entropy(logits.requires_grad_(), torch.full_like(target, 255))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_ohem_component_counts_min_kept_per_image():
    loss = LABELED_LOSSES.get("ohem")(OHEMOptions(threshold=0.7, min_kept=2))
    logits = torch.cat([true_class_logits([0.9, 0.6, 0.3, 0.8])] * 2)
    target = torch.zeros(2, 1, 4, dtype=torch.long)
    # 2 per image x 2 images = 4 kept of 8: the 0.6s and 0.3s of both images.
    assert float(loss(logits, target)) == pytest.approx(mean_nll([0.6, 0.3]), rel=1e-5)
    with pytest.raises(Exception, match="threshold"):
        OHEMOptions(threshold=1.5).validate()


def test_official_rank_weighting_divides_by_the_sum_of_rank_weights():
    from test_rankweight import labeled_features

    from semiseg.pseudo import RankWeighting
    from semiseg.pseudo.unlabeled_loss import CrossEntropyLoss

    features, labels, probs = labeled_features()
    policy = RankWeighting(2, threshold=0.9, k=3, rppi=False, variant="official")
    policy.update(probs, labels, features)
    unlabeled = torch.zeros(1, 6, 1, 3)
    unlabeled[0, :3, 0, 0] = torch.tensor([3.0, 2.0, 1.0])  # top-3 {0,1,2}: class 0's, s = 3
    unlabeled[0, :, 0, 1] = torch.tensor([1.0, 0, 0, 3.0, 2.0, 0])  # {3,4,0} vs {3,4,5}: 2
    unlabeled[0, :, 0, 2] = torch.tensor([3.0, 2.0, 1.0, 0, 0, 0])  # class 0, s = 3
    u_probs = torch.tensor([[0.95, 0.05], [0.02, 0.98], [0.6, 0.4]]).T.reshape(1, 2, 1, 3)
    pl = policy(u_probs, features=unlabeled)
    # The released W = 1 + s / k: 2, 5/3, 2; pixel 2 is below the threshold (weight 0) but
    # its W still counts in the denominator.
    assert pl.weight.flatten().tolist() == pytest.approx([2.0, 5 / 3, 0.0])
    assert pl.extra["normaliser"].flatten().tolist() == pytest.approx([2.0, 5 / 3, 2.0])
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]).T.reshape(1, 2, 1, 3)
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits, pl.target, reduction="none").flatten()
    expected = (2.0 * ce[0] + 5 / 3 * ce[1]) / (2.0 + 5 / 3 + 2.0)
    assert float(CrossEntropyLoss()(logits, pl, valid)) == pytest.approx(float(expected))
    # The paper's variant keeps UniMatch's count of valid pixels.
    paper = RankWeighting(2, threshold=0.9, k=3, rppi=False)
    paper.update(probs, labels, features)
    pl_paper = paper(u_probs, features=unlabeled)
    assert "normaliser" not in pl_paper.extra
    expected = (1.0 * ce[0] + 2 / 3 * ce[1]) / 3
    assert float(CrossEntropyLoss()(logits, pl_paper, valid)) == pytest.approx(float(expected))


def fpl_views(seed: int):
    from semiseg.pseudo import PseudoLabels

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 4, 3, 3, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (1, 3, 3), generator=g)
    positive = torch.rand(1, 4, 3, 3, generator=g) < 0.5
    positive |= torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).bool()
    weight = torch.rand(1, 3, 3, generator=g)
    pl = PseudoLabels(target, weight, torch.ones(1, 3, 3), {"positive": positive})
    return logits, pl, torch.ones(1, 3, 3, dtype=torch.bool)


def test_fpl_joint_rescale_gives_the_plain_cross_entropy_sum_with_fpls_gradient():
    from semiseg.pseudo.fpl import FPLOptions, FuzzyPositiveLoss, fuzzy_positive_loss

    loss = FuzzyPositiveLoss(FPLOptions(rescale="joint"))
    views = [fpl_views(0), fpl_views(1)]
    raw = {f"v{i}": loss(*view) for i, view in enumerate(views)}
    combined = loss.combine(raw)
    plain = sum(
        float(torch.nn.functional.cross_entropy(logits.detach(), pl.target))
        for logits, pl, _ in views
    )
    fpl = [
        float((fuzzy_positive_loss(logits.detach(), pl.extra["positive"]) * pl.weight).sum() / 9)
        for logits, pl, _ in views
    ]
    assert float(raw["v0"].detach()) == pytest.approx(fpl[0], rel=1e-5)
    # One factor for both directions, CE(s1, ps2) + CE(s2, ps1) over FPL's sum.
    factor = plain / sum(fpl)
    assert float(combined["v0"].detach()) == pytest.approx(fpl[0] * factor, rel=1e-5)
    assert float((combined["v0"] + combined["v1"]).detach()) == pytest.approx(plain, rel=1e-5)
    logits = views[0][0]
    (grad,) = torch.autograd.grad(combined["v0"], logits, retain_graph=True)
    (direction,) = torch.autograd.grad(raw["v0"], logits)
    assert torch.allclose(grad, direction * factor, atol=1e-6)
    # The next step starts afresh: its factor comes from its own views only.
    again = loss.combine({"v0": loss(*views[0])})
    single = float(torch.nn.functional.cross_entropy(views[0][0].detach(), views[0][1].target))
    assert float(again["v0"].detach()) == pytest.approx(single, rel=1e-5)


def test_fpl_each_rescale_gives_each_views_weighted_cross_entropy():
    from semiseg.pseudo.fpl import FPLOptions, FuzzyPositiveLoss
    from semiseg.pseudo.unlabeled_loss import weighted_cross_entropy

    loss = FuzzyPositiveLoss(FPLOptions(rescale="each"))
    logits, pl, valid = fpl_views(2)
    value = loss(logits, pl, valid)
    assert float(value.detach()) == pytest.approx(
        float(weighted_cross_entropy(logits.detach(), pl.target, pl.weight, valid)), rel=1e-5
    )
    assert loss.combine({"v": value})["v"] is value


def test_legacy_fpl_rescale_booleans_upgrade():
    from semiseg.config import config_from_dict
    from semiseg.config_legacy import upgrade

    for old, new in [(True, "each"), (False, "off")]:
        saved = {
            "data": {"root": "data", "labeled": "l.txt", "unlabeled": "u.txt"},
            "scheme": {"name": "cps"},
            "policy": {"name": "pseudo_label"},
            "loss": {"name": "fpl", "rescale": old},
        }
        assert config_from_dict(upgrade(saved)).loss.rescale == new


def scripted_uniforms(monkeypatch, values: list[float]) -> None:
    """Make the CutMix box generator draw `values` (fractions of its range) in order."""
    from semiseg.data import transforms

    draws = iter(values)
    monkeypatch.setattr(transforms, "_uniform", lambda lo, hi, g=None: lo + (hi - lo) * next(draws))


def test_cps_boxes_cover_their_share_and_combine_by_xor(monkeypatch):
    from semiseg.data.transforms import cutmix_box

    # 2 boxes of share 0.5 on 16 x 16: shrink sqrt(1/2); u = 1 gives height fraction 0.5, so
    # 6 x 11 boxes (round(0.5 * 0.707 * 16), round(1.0 * 0.707 * 16)).
    # Draws per box: share, u, top, left; the first draw is the p test.
    scripted_uniforms(monkeypatch, [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    box = cutmix_box(16, 16, p=1.0, count=2, area=(0.5, 0.5))
    first = torch.zeros(16, 16, dtype=torch.bool)
    first[0:6, 0:11] = True
    second = torch.zeros(16, 16, dtype=torch.bool)
    second[10:16, 5:16] = True
    assert torch.equal(box, first ^ second)
    # The same box twice cancels out: XOR, not union.
    scripted_uniforms(monkeypatch, [0.0] + [0.0, 1.0, 0.5, 0.5] * 2)
    assert not cutmix_box(16, 16, p=1.0, count=2, area=(0.5, 0.5)).any()


def test_cps_scheme_mixes_every_view_with_three_boxes_in_the_area_range():
    from semiseg.data.transforms import cutmix_box
    from semiseg.schemes.cps import CPSOptions

    options = CPSOptions()
    assert (options.cutmix_p, options.cutmix_boxes, options.cutmix_area) == (1.0, 3, [0.25, 0.5])
    g = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(300):
        box = cutmix_box(
            96, 96, p=options.cutmix_p, count=3, area=tuple(options.cutmix_area), generator=g
        )
        shares.append(float(box.float().mean()))
    assert min(shares) > 0  # every view mixed
    # Three boxes of p/3 each, p <= 0.5: at most half the crop, less where they overlap.
    assert max(shares) <= 0.5 + 0.02
    assert 0.2 < sum(shares) / len(shares) < 0.4


def test_same_image_cutmix_source_gives_the_same_images_augmented_differently():
    from semiseg.data.sampling import ResumableSampler

    plain = list(itertools.islice(ResumableSampler(10, seed=3), 25))
    salted = list(itertools.islice(ResumableSampler(10, seed=3, salt=1), 25))
    assert [i for i, _ in plain] == [i for i, _ in salted]
    assert all(a != b for (_, a), (_, b) in zip(plain, salted, strict=True))


def test_epochs_resolve_from_the_split_size(tmp_path):
    from semiseg import schedule
    from semiseg.config import config_from_dict

    (tmp_path / "l.txt").write_text("".join(f"a{i}.png a{i}.png\n" for i in range(92)))
    (tmp_path / "u.txt").write_text("# comment\n" + "".join(f"b{i}.png\n" for i in range(1370)))
    cfg = config_from_dict(
        {
            "data": {"root": str(tmp_path), "labeled": "l.txt", "unlabeled": "u.txt"},
            "scheme": {"name": "unimatch"},
            "train": {"epochs": 80},
        }
    )
    cfg.data.batch_size = 2
    # 1,370 unlabeled over 8 processes: ceil(1370 / 8) = 172 per process, 86 batches of 2.
    resolved, note = schedule.resolve(cfg, processes=8)
    assert resolved.train.iterations == 80 * 86
    assert "1370 images" in note and "6880 iterations" in note
    supervised = config_from_dict(
        {
            "data": {"root": str(tmp_path), "labeled": "l.txt", "batch_size": 2},
            "train": {"epochs": 80},
        }
    )
    # 92 labeled over 4 processes: 23 each, 11 batches.
    assert schedule.planned_iterations(supervised, processes=4) == 80 * 11


def test_dars_rotation_moves_image_and_mask_together_and_blur_smooths():
    from semiseg.data.transforms import TrainTransform

    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    mask = torch.ones(64, 64, dtype=torch.long)
    plain = TrainTransform(64, scale_range=(1.0, 1.0), hflip=False)
    rotating = TrainTransform(64, scale_range=(1.0, 1.0), hflip=False, rotate=10.0)
    rotated = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = rotating(image, mask)
        torch.manual_seed(seed)
        assert torch.equal(plain(image, mask)["mask"], mask)
        if out["mask"][0, 0] == 255:
            rotated += 1
            # Outside the rotated image: ignore in the mask, the mean (0 normalised) in the image.
            assert out["image"][:, 0, 0].abs().max() < 0.05
            assert int(out["mask"][32, 32]) == 1
            assert out["image"][:, 32, 32].allclose(plain(image, mask)["image"][:, 32, 32])
        else:
            assert torch.equal(out["mask"], mask)
    assert 0 < rotated < 12  # with probability 0.5
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255
    checker = checker.to(torch.uint8).expand(3, 64, 64)
    blurring = TrainTransform(64, scale_range=(1.0, 1.0), hflip=False, blur=True)
    spreads = set()
    for seed in range(12):
        torch.manual_seed(seed)
        spreads.add(round(float(blurring(checker)["image"].std()), 3))
    assert len(spreads) == 2  # blurred or not, with probability 0.5


# The paper-scale presets against docs/recipes.md: every row of a preset's table that names a
# config key holds the preset's value; `@iterations` rows hold the schedule resolved from
# split lists of the released sizes, at the number of processes the row names.
RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
CONFIGS = RECIPES.parent.parent / "configs"
RELEASED_SPLITS = {
    "splits/cityscapes/1_8/labeled.txt": 372,
    "splits/cityscapes/1_8/unlabeled.txt": 2603,
    "splits/cityscapes/1_4/labeled.txt": 744,
    "splits/cityscapes/1_4/unlabeled.txt": 2231,
    "splits/pascal/92/labeled.txt": 92,
    "splits/pascal/92/unlabeled.txt": 10490,
    "splits/pascal/1464/labeled.txt": 1464,
    "splits/pascal/1464/unlabeled.txt": 9118,
    "splits/pascal/1_16/labeled.txt": 662,
    "splits/pascal/1_16/unlabeled.txt": 9920,
    "splits/pascal/1_8/labeled.txt": 1323,
    "splits/pascal/1_8/unlabeled.txt": 9259,
}


def paper_scale_presets() -> list[str]:
    return sorted(
        p.name
        for p in CONFIGS.glob("*.yaml")
        if "camvid" not in p.name and "synthetic" not in p.name
    )


def recipe_tables() -> dict[str, list[dict[str, str]]]:
    """preset file name -> the rows of its table in docs/recipes.md."""
    tables: dict[str, list[dict[str, str]]] = {}
    current = None
    columns: list[str] = []
    for line in RECIPES.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^### `([^`]+\.yaml)`", line)
        if heading:
            current = heading.group(1)
            tables[current], columns = [], []
        elif current and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not columns:
                columns = cells
            else:
                tables[current].append(dict(zip(columns, cells, strict=True)))
        elif line.startswith("## "):
            current = None
    return tables


def fake_released_splits(root: Path) -> None:
    for path, count in RELEASED_SPLITS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("".join(f"x/{i}.png\n" for i in range(count)))


def lookup(cfg, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def resolved_iterations(cfg, processes: int, round_index: int = 0) -> int:
    """The iterations of a run of `cfg` (of one self-training round) at `processes`."""
    from semiseg import schedule
    from semiseg.offline.rounds import round_config

    if cfg.scheme.name == "self_training":
        cfg = round_config(cfg, round_index, Path("teacher.pt") if round_index else None)
    return schedule.planned_iterations(cfg, processes)


def load_preset(name: str, root: Path):
    from semiseg.config import load_config

    return load_config(CONFIGS / name, [f"data.root={root}"])


def cell_value(text: str):
    """A table cell as the config value it states, in YAML: `801`, `ohem`, `[0.25, 0.5]`."""
    import yaml

    return yaml.safe_load(text.strip("`"))


def test_every_paper_scale_preset_has_a_recipe_table():
    tables = recipe_tables()
    assert sorted(tables) == paper_scale_presets()
    for name, rows in tables.items():
        keys = {row["key"] for row in rows}
        for needed in ("data.crop_size", "data.batch_size", "optim.lr", "optim.head_lr_mult"):
            assert f"`{needed}`" in keys, f"{name}: no {needed} row"
        assert any(k.startswith("`@iterations") for k in keys), f"{name}: no iterations row"
        assert all(row["released"] for row in rows), f"{name}: a row without a released value"


@pytest.mark.parametrize("preset", paper_scale_presets())
def test_preset_matches_its_recipe_table(preset, tmp_path):
    fake_released_splits(tmp_path)
    cfg = load_preset(preset, tmp_path)
    rows = recipe_tables()[preset]
    checked = 0
    for row in rows:
        key = row["key"].strip("`")
        if not key or key == "-":
            continue
        stated = row["semiseg"]
        if key.startswith("@iterations"):
            number, processes = re.match(r"`?([\d,]+)`? at (\d+) process", stated).groups()
            round_index = int(key.split("round")[1]) if "round" in key else 0
            actual = resolved_iterations(cfg, int(processes), round_index)
            assert actual == int(number.replace(",", "")), (
                f"{preset}: {key} is {actual}, table {stated}"
            )
        else:
            actual = lookup(cfg, key)
            actual = list(actual) if isinstance(actual, tuple) else actual
            expected = cell_value(stated)
            if isinstance(actual, float) or isinstance(expected, float):
                assert actual == pytest.approx(expected), (
                    f"{preset}: {key} is {actual!r}, table {stated}"
                )
            else:
                assert actual == expected, f"{preset}: {key} is {actual!r}, table {stated}"
        checked += 1
    assert checked >= 8
