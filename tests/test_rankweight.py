"""Rank-statistics weights, the feature memory bank, and boxes from masks (RPPI)."""

from __future__ import annotations

import pytest
import torch

from semiseg.pseudo.detector import (
    box_agreement_counts,
    box_class_map,
    boxes_from_mask,
    reliable_pixels,
)
from semiseg.pseudo.memory import FeatureBank, combined_prototypes
from semiseg.pseudo.rankweight import cosine_weight, rank_overlap, rank_weight, top_k_mask


def pixel_features(*vectors: list[float]) -> torch.Tensor:
    """Feature vectors as a [1, D, 1, N] map (N pixels in a row)."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_rank_weight_on_hand_made_features():
    prototypes = torch.tensor(
        [
            [9.0, 8.0, 7.0, 0.0, 0.0, 0.0],  # class 0: top-3 dims {0, 1, 2}
            [0.0, 0.0, 1.0, 5.0, 6.0, 7.0],  # class 1: top-3 dims {3, 4, 5}
        ]
    )
    features = pixel_features(
        [3.0, 2.0, 1.0, 0.0, 0.0, 0.0],  # top-3 {0, 1, 2}
        [3.0, 0.0, 2.0, 0.0, 1.0, 0.0],  # top-3 {0, 2, 4}
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied: top-3 by index {0, 1, 2}
        [1.0, 1.0, 0.0, 5.0, 1.0, 0.0],  # ties at 1.0: top-3 {3, 0, 1}
    )
    labels = torch.tensor([[[0, 0, 1, 1]]])
    w = rank_weight(features, prototypes, labels, k=3)
    assert w.flatten().tolist() == pytest.approx([3 / 3, 2 / 3, 0 / 3, 1 / 3])
    official = rank_weight(features, prototypes, labels, k=3, variant="official")
    assert official.flatten().tolist() == pytest.approx([2.0, 5 / 3, 1.0, 4 / 3])
    # No prototype yet for class 1: weight 1; no pseudo label: weight 0.
    valid = torch.tensor([True, False])
    assert rank_weight(features, prototypes, labels, 3, valid).flatten().tolist() == pytest.approx(
        [1.0, 2 / 3, 1.0, 1.0]
    )
    ignored = torch.tensor([[[255, 0, 1, 1]]])
    assert rank_weight(features, prototypes, ignored, k=3).flatten()[0] == 0.0


def test_ties_are_broken_by_lower_index_and_k_is_checked():
    assert top_k_mask(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), 2, dim=1).tolist() == [
        [False, True, True, False]
    ]
    assert top_k_mask(torch.tensor([[3.0, 2.0, 2.0, 5.0]]), 3, dim=1).tolist() == [
        [True, True, False, True]
    ]
    with pytest.raises(ValueError, match="k must be"):
        top_k_mask(torch.zeros(1, 4), 5, dim=1)


def test_top_k_mask_is_the_set_a_stable_descending_sort_gives():
    torch.manual_seed(0)
    # Few distinct values: many ties at the k-th place.
    values = torch.randint(0, 4, (3, 16, 5, 6)).float()
    for k in (1, 5, 16):
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        expected = torch.zeros_like(values, dtype=torch.bool).scatter(1, order, True)
        assert torch.equal(top_k_mask(values, k, dim=1), expected), k
    prototypes = torch.rand(4, 16)
    members = torch.zeros(4, 16, dtype=torch.bool).scatter(
        1, prototypes.sort(dim=1, descending=True, stable=True).indices[:, :5], True
    )
    pixel = torch.zeros_like(values, dtype=torch.bool).scatter(
        1, values.sort(dim=1, descending=True, stable=True).indices[:, :5], True
    )
    expected = (pixel[:, None] & members[None, :, :, None, None]).sum(2)
    assert torch.equal(rank_overlap(values, prototypes, 5), expected)


def test_rank_weight_of_low_resolution_features_equals_nearest_upsampled_features():
    torch.manual_seed(0)
    features = torch.rand(2, 16, 3, 4)
    prototypes = torch.rand(5, 16)
    labels = torch.randint(0, 5, (2, 12, 16))
    labels[0, 0, 0] = 255
    up = torch.nn.functional.interpolate(features, size=(12, 16), mode="nearest")
    expected = rank_weight(up, prototypes, labels, k=4)
    torch.testing.assert_close(rank_weight(features, prototypes, labels, k=4), expected)


def test_cosine_weight_is_the_clamped_cosine_of_the_pseudo_class():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = pixel_features([1.0, 1.0], [-1.0, 0.0])
    w = cosine_weight(features, prototypes, torch.tensor([[[0, 0]]]))
    assert w.flatten().tolist() == pytest.approx([2**-0.5, 0.0])


def test_feature_bank_is_fifo_newest_first_with_fixed_size():
    bank = FeatureBank(num_classes=3, dim=2, size=3)
    bank.push(torch.tensor([[1.0, 0], [2.0, 0], [9.0, 9]]), torch.tensor([0, 0, 255]))
    assert bank.features(0)[:, 0].tolist() == [2.0, 1.0]
    bank.push(torch.tensor([[3.0, 0], [4.0, 0], [5.0, 5]]), torch.tensor([0, 0, 1]))
    assert bank.features(0)[:, 0].tolist() == [4.0, 3.0, 2.0]  # oldest (1.0) dropped
    assert bank.counts.tolist() == [3, 1, 0]
    prototypes, valid = bank.prototypes()
    assert prototypes[0].tolist() == [3.0, 0.0] and valid.tolist() == [True, True, False]

    limited = FeatureBank(num_classes=1, dim=1, size=10, per_update=2, seed=0)
    limited.push(torch.arange(8.0).unsqueeze(1), torch.zeros(8, dtype=torch.long))
    assert limited.counts.tolist() == [2]
    state = limited.state_dict()
    copy = FeatureBank(num_classes=1, dim=1, size=10, per_update=2, seed=99)
    copy.load_state_dict(state)
    batch = torch.arange(8.0, 16.0).unsqueeze(1), torch.zeros(8, dtype=torch.long)
    limited.push(*batch)
    copy.push(*batch)
    assert torch.equal(limited.features(0), copy.features(0))  # the generator state round-trips


def test_feature_bank_keeps_a_random_subset_when_a_class_has_more_pixels_than_it_takes():
    bank = FeatureBank(num_classes=1, dim=1, size=4, seed=0)  # per_update None: up to size
    bank.push(torch.arange(100.0).unsqueeze(1), torch.zeros(100, dtype=torch.long))
    kept = bank.features(0)[:, 0]
    assert kept.numel() == 4 and kept.unique().numel() == 4
    assert kept.tolist() != [99.0, 98.0, 97.0, 96.0]  # not the last pixels in raster order
    assert kept.min() < 90  # draws from the whole batch (p of all >= 90 is (10/100)^4)


def test_combined_prototypes_need_a_labeled_feature():
    labeled, unlabeled = FeatureBank(2, 1, 4), FeatureBank(2, 1, 4)
    labeled.push(torch.tensor([[2.0]]), torch.tensor([0]))
    unlabeled.push(torch.tensor([[4.0], [7.0]]), torch.tensor([0, 1]))
    prototypes, valid = combined_prototypes(labeled, unlabeled)
    assert prototypes[0].item() == 3.0 and valid.tolist() == [True, False]


def test_boxes_from_mask_with_several_components_and_excluded_classes():
    mask = torch.zeros(6, 8, dtype=torch.long)
    mask[0:2, 0:2] = 3
    mask[3, 3] = 3
    mask[4, 4] = 3  # diagonal neighbour: the same 8-connected component as (3, 3)
    mask[5, 7] = 3
    mask[1:4, 5:7] = 5
    mask[0, 7] = 255
    boxes, labels = boxes_from_mask(mask, classes=[3, 5, 9])
    assert boxes.tolist() == [[0, 0, 2, 2], [3, 3, 5, 5], [7, 5, 8, 6], [5, 1, 7, 4]]
    assert labels.tolist() == [3, 3, 3, 5]
    assert boxes_from_mask(mask, classes=[0])[0].tolist() == [[0, 0, 8, 6]]
    empty_boxes, empty_labels = boxes_from_mask(mask, classes=[7])
    assert empty_boxes.shape == (0, 4) and empty_labels.shape == (0,)


def test_reliable_pixels_need_box_agreement_and_confidence():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    inside = box_class_map(boxes, torch.tensor([1]), num_classes=2, size=(2, 3))
    assert inside[1].tolist() == [[True, True, False], [False, False, False]]
    pred = torch.tensor([[[1, 0, 1], [1, 1, 1]]])
    conf = torch.tensor([[[0.99, 0.99, 0.99], [0.99, 0.99, 0.99]]])
    conf[0, 0, 1] = 0.5
    reliable = reliable_pixels(pred, conf, inside.unsqueeze(0), 0.95)
    assert reliable.tolist() == [[[True, False, False], [False, False, False]]]


def test_box_agreement_counts_split_confident_pixels_by_their_class_box():
    # One row of 6 pixels; a detected box of class 1 covers columns 0-2.
    inside = box_class_map(
        torch.tensor([[0.0, 0.0, 3.0, 1.0]]), torch.tensor([1]), num_classes=3, size=(1, 6)
    )
    pred = torch.tensor([[[1, 1, 0, 1, 1, 2]]])
    conf = torch.tensor([[[0.99, 0.99, 0.99, 0.99, 0.5, 0.99]]])
    target = torch.tensor([[[1, 2, 0, 1, 1, 255]]])
    counts = box_agreement_counts(pred, conf, target, inside[None], 0.9)
    # Pixel: columns 0-3 (column 4 is not confident, column 5 has no ground truth).
    assert counts[0].tolist() == [[1, 2, 0], [1, 3, 0]]
    # Pixel ∩ BBox: columns 0 and 1 (column 2 lies in the box but is predicted 0, not 1).
    assert counts[1].tolist() == [[0, 1, 0], [0, 2, 0]]
    # Pixel \ BBox: columns 2 and 3.
    assert counts[2].tolist() == [[1, 1, 0], [1, 1, 0]]


# ------------------------------------------------------------------ the RPPI detector
def detector_config(synthetic_root, tmp_path, **detector):
    from conftest import tiny_config

    from semiseg.config import config_from_dict

    raw = tiny_config(
        synthetic_root, tmp_path / "run", scheme={"name": "fixmatch"}, train={"threads": 1}
    )
    raw["policy"] = {
        "name": "rankweight",
        "detector": {
            "classes": [3, 4, 5],
            "backbone": "mobilenet_v3_fpn",
            "dir": str(tmp_path / "detector"),
            "iterations": 3,
            "batch_size": 1,
            "min_size": 64,
            "max_size": 96,
            "score_threshold": 0.0,
            "checkpoint_every": 1,
            **detector,
        },
    }
    return config_from_dict(raw)


@pytest.mark.slow
def test_detector_trains_resumes_exactly_detects_and_scores(synthetic_root, tmp_path, monkeypatch):
    import semiseg.offline.detector_training as detection
    from semiseg.checkpoint import load_checkpoint
    from semiseg.data.formats import get_format
    from semiseg.data.splits import read_split

    fmt = get_format("folder", None, root=synthetic_root / "data")
    labeled = read_split(
        synthetic_root / "labeled.txt", synthetic_root / "data", require_mask=True
    )[:4]
    reference = detector_config(synthetic_root, tmp_path / "a")
    detection.train_detector(reference, labeled, fmt, torch.device("cpu"), progress=False)

    killed = detector_config(synthetic_root, tmp_path / "b")
    original, calls = detection.detection_target, []

    def dying(*args):
        calls.append(1)
        if len(calls) == 3:  # the sample of the third step: the checkpoint at step 2 survives
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(detection, "detection_target", dying)
    with pytest.raises(KeyboardInterrupt):
        detection.train_detector(killed, labeled, fmt, torch.device("cpu"), progress=False)
    monkeypatch.setattr(detection, "detection_target", original)
    assert load_checkpoint(tmp_path / "b" / "detector" / "latest.pt")["iteration"] == 2
    detection.train_detector(killed, labeled, fmt, torch.device("cpu"), progress=False)
    a = load_checkpoint(tmp_path / "a" / "detector" / "latest.pt")["models"]["detector"]
    b = load_checkpoint(tmp_path / "b" / "detector" / "latest.pt")["models"]["detector"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    folder = detection.detect(reference, labeled, torch.device("cpu"), progress=False)
    assert len(list(folder.glob("*.json"))) == 4
    boxes, classes = detection.detection_cache(reference).load(0)
    assert boxes.shape[1] == 4 and set(classes.tolist()) <= {3, 4, 5}
    result = detection.box_accuracy(reference, labeled, fmt)
    assert result["detections"] == sum(result["per_class_count"].values())
    with pytest.raises(Exception, match="another detector config"):
        detection.train_detector(
            detector_config(synthetic_root, tmp_path / "a", lr=1e-3),
            labeled,
            fmt,
            torch.device("cpu"),
        )


# ------------------------------------------------------------------- the policy
def test_unlabeled_transform_carries_detector_bits_through_the_crop():
    from semiseg.data.transforms import TrainTransform, UnlabeledTransform, denormalize

    image = torch.zeros(3, 8, 10, dtype=torch.uint8)
    image[:, :, :5] = 255  # the boxed left half is white, so it can be found after a flip
    detections = torch.zeros(8, 10, dtype=torch.int64)
    detections[:, :5] = 0b101  # inside boxes of detector classes 0 and 2
    mask = torch.full((8, 10), 7, dtype=torch.int64)
    mask[0, 0] = 255
    views = UnlabeledTransform(TrainTransform(12, (1.0, 1.0), hflip=True))  # crop > image: padding
    for seed in range(4):  # both flip outcomes
        torch.manual_seed(seed)
        out = views(image, mask, detections=detections)
        valid = out["valid"]
        assert int(valid.sum()) == 80 and torch.all(out["detections"][~valid] == 0)
        white = denormalize(out["image"])[0] == 255
        assert torch.equal(out["detections"] == 5, white & valid)
        assert set(out["oracle_mask"][valid].unique().tolist()) == {7, 255}


def labeled_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 classes, D = 6: class 0 features peak on dims 0-2, class 1 on dims 3-5; 1 x 2 x 2."""
    f = torch.zeros(1, 6, 2, 2)
    f[0, :3, :, 0] = torch.tensor([3.0, 2.0, 1.0])[:, None]
    f[0, 3:, :, 1] = torch.tensor([1.0, 2.0, 3.0])[:, None]
    labels = torch.tensor([[[0, 1], [0, 1]]])
    probs = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    return f, labels, probs


def test_rank_policy_weights_threshold_times_rank_and_round_trips():
    from semiseg.pseudo import RankWeighting

    features, labels, probs = labeled_features()
    policy = RankWeighting(2, threshold=0.9, k=3, rppi=False)
    policy.update(probs, labels, features)
    unlabeled = torch.zeros(1, 6, 1, 3)
    unlabeled[0, :3, 0, 0] = torch.tensor([3.0, 2.0, 1.0])  # looks like class 0
    unlabeled[0, :, 0, 1] = torch.tensor([1.0, 0, 0, 3.0, 2.0, 0])  # top-3 {3, 4, 0}
    unlabeled[0, :, 0, 2] = torch.tensor([3.0, 2.0, 1.0, 0, 0, 0])
    u_probs = torch.tensor([[0.95, 0.05], [0.02, 0.98], [0.6, 0.4]]).T.reshape(1, 2, 1, 3)
    pl = policy(u_probs, features=unlabeled)
    # pixel 0: class 0, overlap 3/3; pixel 1: class 1 vs {3,4,5}: 2/3; pixel 2: below threshold.
    assert pl.target.flatten().tolist() == [0, 1, 0]
    assert pl.weight.flatten().tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert policy.diagnostics()["prototypes"] == 2.0
    restored = RankWeighting(2, threshold=0.9, k=3, rppi=False)
    restored.load_state_dict(policy.state_dict())
    assert torch.equal(restored(u_probs, features=unlabeled).weight, pl.weight)
    with pytest.raises(ValueError, match="needs the teacher's features"):
        policy(u_probs)


def test_rppi_adds_only_detector_verified_confident_pixels_to_the_unlabeled_bank():
    from semiseg.pseudo import RankWeighting

    features, labels, probs = labeled_features()
    policy = RankWeighting(
        2, threshold=0.0, k=3, rppi=True, reliable_threshold=0.9, detector_classes=[1]
    )
    policy.update(probs, labels, features)
    unlabeled = torch.rand(1, 6, 1, 3)
    u_probs = torch.tensor([[0.02, 0.98], [0.02, 0.98], [0.3, 0.7]]).T.reshape(1, 2, 1, 3)
    boxes = torch.tensor([[[1, 0, 1]]])  # bit 0 = a box of class 1 covers pixels 0 and 2
    policy(u_probs, features=unlabeled, detections=boxes)
    # Pixel 0: class 1, in a box, confident -> reliable. Pixel 1: no box. Pixel 2: not confident.
    assert policy.unlabeled_bank.counts.tolist() == [0, 1]
    assert torch.equal(policy.unlabeled_bank.features(1)[0], unlabeled[0, :, 0, 0])
    assert policy.diagnostics()["reliable_fraction"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="detector boxes"):
        policy(u_probs, features=unlabeled)


@pytest.mark.parametrize("scheme", ["fixmatch", "unimatch"])
def test_rank_policy_trains_with_ppw_and_with_cached_detections(
    synthetic_root, tmp_path, scheme, capsys
):
    import json
    import math

    from conftest import tiny_config

    from semiseg.config import config_from_dict
    from semiseg.data.formats import DataError, get_format
    from semiseg.data.splits import read_split
    from semiseg.engine import Trainer
    from semiseg.metrics_log import read_metrics
    from semiseg.offline.detector_training import PIXEL_GROUPS, pixel_box_accuracy
    from semiseg.training import train

    def config(name: str, rppi: bool):
        raw = tiny_config(
            synthetic_root,
            tmp_path / name,
            scheme={"name": scheme},
            policy={
                "name": "rankweight",
                "threshold": 0.0,
                "rppi": rppi,
                "reliable_threshold": 0.0,
                "detector": {"classes": [3, 4, 5], "dir": str(tmp_path / "detector")},
            },
            train={"iterations": 2, "eval_every": 2, "log_every": 1},
        )
        return config_from_dict(raw)

    train(config("ppw", rppi=False), progress=False)
    last = [r for r in read_metrics(tmp_path / "ppw" / "metrics.jsonl") if r["split"] == "train"][
        -1
    ]
    assert 0 <= last["policy/mean_rank_weight"] <= 1 and last["policy/prototypes"] >= 1

    with pytest.raises(DataError, match="semiseg detector detect"):
        Trainer(config("rppi", rppi=True), progress=False)
    folder = tmp_path / "detector" / "detections"
    folder.mkdir(parents=True)
    for i in range(16):  # one image-wide box of class 3 on every unlabeled image
        record = {"image": "", "boxes": [[0, 0, 64, 48]], "classes": [3], "scores": [0.99]}
        (folder / f"{i:06d}.json").write_text(json.dumps(record))
    train(config("rppi", rppi=True), progress=False)
    last = [r for r in read_metrics(tmp_path / "rppi" / "metrics.jsonl") if r["split"] == "train"][
        -1
    ]
    assert math.isfinite(last["loss"]) and last["policy/reliable_fraction"] > 0
    assert last["policy/unlabeled_bank_fill"] > 0

    # Supplement Table 1 with the trained model: the image-wide boxes hold every pixel of class 3.
    cfg = config("rppi", rppi=True)
    fmt = get_format("folder", None, root=synthetic_root / "data")
    samples = read_split(
        synthetic_root / "unlabeled.txt", synthetic_root / "data", require_mask=True
    )
    table = pixel_box_accuracy(
        cfg, tmp_path / "rppi" / "latest.pt", samples, fmt, torch.device("cpu"), progress=False
    )
    pixel, in_box, outside = (table["groups"][name] for name in PIXEL_GROUPS)
    assert (
        in_box["per_class_pixels"][3] == pixel["per_class_pixels"][3]
        and outside["per_class_pixels"][3] == 0
    )
    assert (
        in_box["per_class_pixels"][4] == 0
        and outside["per_class_pixels"][4] == pixel["per_class_pixels"][4]
    )
    assert pixel["things_pixels"] == sum(pixel["per_class_pixels"].values())

    # The same from the command line, with box accuracy at two IoUs.
    import yaml

    from semiseg.cli import main
    from semiseg.config import config_to_dict

    path = tmp_path / "rppi.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    capsys.readouterr()
    assert (
        main(
            [
                "detector",
                "eval",
                str(path),
                "--iou",
                "0.8",
                "0.1",
                "--checkpoint",
                str(tmp_path / "rppi" / "latest.pt"),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "16 detections" in printed and "at IoU >= 0.8" in printed and "at IoU >= 0.1" in printed
    assert "Pixel ∩ BBox" in printed
