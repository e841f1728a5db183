"""benchmarks/pseudo_label_classes.py --labels: a written pseudo-label set scored per class
against the images' own masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark, tiny_config
from PIL import Image

from semiseg.config import config_from_dict, save_config
from semiseg.data.formats import DataError, Sample, read_label_image
from semiseg.data.splits import read_split, write_split

pseudo_label_classes = load_benchmark("pseudo_label_classes")


def _round_folder(synthetic_root: Path, tmp_path: Path) -> tuple[Path, list[Sample]]:
    round_dir = tmp_path / "round1"
    (round_dir / "pseudo" / "labels").mkdir(parents=True)
    save_config(config_from_dict(tiny_config(synthetic_root, tmp_path)), round_dir / "config.yaml")
    data = synthetic_root / "data"
    return round_dir, read_split(synthetic_root / "unlabeled.txt", data, require_mask=True)[:2]


def test_written_labels_scored_against_the_masks(synthetic_root, tmp_path):
    round_dir, (a, b) = _round_folder(synthetic_root, tmp_path)
    mask_a, mask_b = read_label_image(a.mask), read_label_image(b.mask)
    # Image a: its own mask, but its left half left unlabeled. Image b: everything class 0.
    label_a = mask_a.copy()
    label_a[:, : mask_a.shape[1] // 2] = 255
    label_b = np.zeros_like(mask_b)
    written = []
    for name, label, sample in (("a.png", label_a, a), ("b.png", label_b, b)):
        path = round_dir / "pseudo" / "labels" / name
        Image.fromarray(label).save(path)
        written.append(Sample(sample.image, path))
    write_split(round_dir / "pseudo" / "list.txt", written, synthetic_root / "data")

    counts, names, images = pseudo_label_classes.written_confusion(round_dir / "pseudo")

    num_classes = len(names)
    assert images == 2 and counts.shape == (num_classes, num_classes + 1)
    valid_a, valid_b = mask_a != 255, mask_b != 255
    left = np.zeros_like(valid_a)
    left[:, : mask_a.shape[1] // 2] = True
    assert counts[:, num_classes].sum() == (valid_a & left).sum()
    assert counts.diagonal().sum() == (valid_a & ~left).sum() + (valid_b & (mask_b == 0)).sum()
    assert counts[:, 0].sum() == (valid_b.sum() + (valid_a & ~left & (mask_a == 0)).sum())
    assert counts.sum() == valid_a.sum() + valid_b.sum()


def test_a_folder_without_a_round_config_is_named(tmp_path):
    (tmp_path / "pseudo").mkdir()
    (tmp_path / "pseudo" / "list.txt").write_text("")
    with pytest.raises(DataError, match="not a round's pseudo-label folder"):
        pseudo_label_classes.written_confusion(tmp_path / "pseudo")


def test_fuzzy_set_counts_by_true_class():
    # Sorted cumulative probabilities 0.4, 0.75, 1.0 first exceed T = 0.9 at n = 3, so the set
    # is the top K = 2 classes {0, 1}; 0.95 on one class gives K = 1 (Alg. 1).
    wide = [0.4, 0.35, 0.25]
    sure = [0.95, 0.03, 0.02]
    pixels = [sure, wide, wide, wide, sure, wide]
    probs = torch.tensor(pixels).T.reshape(1, 3, 2, 3)
    # truth 0 sure (K 1), 1 in the set but not first (case 2), 2 outside it (case 3),
    # 0 first in a wide set, ignored, 0 again in a wide set.
    mask = torch.tensor([[0, 1, 2], [0, 255, 0]]).unsqueeze(0)

    counts = pseudo_label_classes.fuzzy_set_counts(probs, mask, 0.9)

    assert counts.tolist() == [[3, 2, 0, 0, 5], [1, 1, 1, 0, 2], [1, 1, 0, 1, 2]]
    table = pseudo_label_classes.fuzzy_table(counts, ["a", "b", "c"])
    assert table[2] == "| a | 66.7 % | 0.0 % | 0.0 % | 1.67 |"
    assert table[-1] == "| all | 80.0 % | 25.0 % | 25.0 % | 1.80 |"
