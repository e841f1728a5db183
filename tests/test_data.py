"""Data layer: formats, split lists, the dataset, validation and synthetic scenes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg.data import (
    DataError,
    EvalTransform,
    Sample,
    SegmentationDataset,
    TrainTransform,
    check_samples,
    colorize,
    get_format,
    make_split,
    make_synthetic_dataset,
    parse_fraction,
    read_class_names,
    read_split,
    render_scene,
    write_split,
)

CAMVID_ROOT = Path(
    os.environ.get(
        "SEMISEG_CAMVID", Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
    )
)


def save_image(path: Path, height: int = 12, width: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def save_mask(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def random_labels(
    height: int = 12, width: int = 16, num_classes: int = 6, seed: int = 0
) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, (height, width)).astype(np.uint8)


def folder_dataset(root: Path, count: int = 4, subset: str = "train") -> list[Sample]:
    """A 'folder' layout with `count` 12x16 samples of 6 classes."""
    samples = []
    for i in range(count):
        image = save_image(root / "images" / subset / f"{i:03d}.png", seed=i)
        mask = save_mask(root / "masks" / subset / f"{i:03d}.png", random_labels(seed=i))
        samples.append(Sample(image.resolve(), mask.resolve()))
    (root / "classes.txt").write_text("a\nb\nc\nd\ne\nf\n")
    return samples


# ---------------------------------------------------------------- formats


def test_folder_format_lists_pairs_and_reads_classes(tmp_path):
    samples = folder_dataset(tmp_path)
    fmt = get_format("folder", root=tmp_path)
    assert fmt.num_classes == 6 and fmt.class_names == ("a", "b", "c", "d", "e", "f")
    assert len(fmt.palette) == 6
    assert fmt.list_samples(tmp_path, "train") == samples
    save_image(tmp_path / "images" / "extra" / "x.jpg")
    assert fmt.list_samples(tmp_path, "extra")[0].mask is None  # no masks folder: unlabeled


def test_folder_format_errors(tmp_path):
    folder_dataset(tmp_path)
    fmt = get_format("folder", num_classes=6)
    with pytest.raises(DataError, match=r"images/val: folder does not exist"):
        fmt.list_samples(tmp_path, "val")
    # An image without its mask is an unlabeled sample (a split keeps it unlabeled).
    (tmp_path / "masks" / "train" / "002.png").unlink()
    samples = fmt.list_samples(tmp_path, "train")
    assert [s.mask is None for s in samples].count(True) == 1
    assert next(s for s in samples if s.mask is None).image.stem == "002"
    with pytest.raises(DataError, match="lists 6 classes"):
        get_format("folder", num_classes=5, root=tmp_path)
    with pytest.raises(DataError, match="unknown dataset format"):
        get_format("ade20k")
    with pytest.raises(DataError, match="19 classes"):
        get_format("cityscapes", num_classes=20)
    (tmp_path / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match=r"classes\.txt:3"):
        read_class_names(tmp_path)


def test_folder_format_without_classes():
    fmt = get_format("folder")
    assert fmt.num_classes is None and fmt.class_names is None
    named = get_format("folder", num_classes=3)
    assert named.class_names == ("class_0", "class_1", "class_2")


def test_voc_layout_classic_and_train_aug(tmp_path):
    ids = ["2007_000032", "2007_000039", "2007_000063"]
    for i, name in enumerate(ids):
        save_image(tmp_path / "JPEGImages" / f"{name}.jpg", seed=i)
        labels = random_labels(num_classes=21, seed=i)
        labels[0] = 255  # object boundaries are stored as 255
        classic = Image.fromarray(labels)
        classic.putpalette([c for colour in get_format("voc").palette for c in colour])
        (tmp_path / "SegmentationClass").mkdir(exist_ok=True)
        classic.save(tmp_path / "SegmentationClass" / f"{name}.png")
        save_mask(tmp_path / "SegmentationClassAug" / f"{name}.png", labels)
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text(f"{ids[0]}\n{ids[1]}\n")
    (lists / "val.txt").write_text(f"{ids[2]}\n")
    fmt = get_format("voc")
    assert fmt.num_classes == 21 and fmt.class_names[15] == "person"
    assert fmt.palette[1] == (128, 0, 0) and fmt.palette[15] == (192, 128, 128)
    train = fmt.list_samples(tmp_path, "train")
    assert [s.image.name for s in train] == [f"{ids[0]}.jpg", f"{ids[1]}.jpg"]
    mask = fmt.load_mask(train[0].mask)
    assert mask.dtype == np.uint8 and (mask[0] == 255).all() and mask[1:].max() < 21
    aug = fmt.list_samples(tmp_path, "train_aug")  # no train_aug.txt: all Aug masks minus val
    assert [s.image.stem for s in aug] == ids[:2]
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in aug)
    (lists / "train_aug.txt").write_text(
        f"/JPEGImages/{ids[1]}.jpg /SegmentationClassAug/{ids[1]}.png\n"
    )
    assert [s.image.stem for s in fmt.list_samples(tmp_path, "train_aug")] == [ids[1]]
    with pytest.raises(DataError, match=r"trainval\.txt"):
        fmt.list_samples(tmp_path, "trainval")


def test_cityscapes_layout_and_missing_train_ids(tmp_path):
    city = "aachen"
    for i in range(2):
        prefix = f"{city}_000000_00001{i}"
        save_image(tmp_path / "leftImg8bit" / "train" / city / f"{prefix}_leftImg8bit.png", seed=i)
        save_mask(
            tmp_path / "gtFine" / "train" / city / f"{prefix}_gtFine_labelTrainIds.png",
            random_labels(num_classes=19, seed=i),
        )
    fmt = get_format("cityscapes")
    samples = fmt.list_samples(tmp_path, "train")
    assert len(samples) == 2 and samples[0].mask.name.endswith("_gtFine_labelTrainIds.png")
    assert fmt.palette[0] == (128, 64, 128) and len(fmt.class_names) == 19
    samples[1].mask.unlink()
    with pytest.raises(DataError, match="createTrainIdLabelImgs"):
        fmt.list_samples(tmp_path, "train")


def test_camvid_maps_void_to_ignore(tmp_path):
    labels = random_labels(num_classes=12)
    labels[:2] = 11
    save_image(tmp_path / "train" / "0001TP_006690.png")
    save_mask(tmp_path / "trainannot" / "0001TP_006690.png", labels)
    fmt = get_format("camvid")
    assert fmt.num_classes == 11 and fmt.class_names[-1] == "Bicyclist"
    (sample,) = fmt.list_samples(tmp_path, "train")
    mask = fmt.load_mask(sample.mask)
    assert (mask[:2] == 255).all()
    assert set(np.unique(mask)) <= set(range(11)) | {255}
    assert (mask[labels != 11] == labels[labels != 11]).all()
    with pytest.raises(DataError, match="valannot|val: folder"):
        fmt.list_samples(tmp_path, "val")


@pytest.mark.camvid
@pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason=f"no CamVid at {CAMVID_ROOT}")
def test_real_camvid():
    fmt = get_format("camvid")
    train = fmt.list_samples(CAMVID_ROOT, "train")
    val = fmt.list_samples(CAMVID_ROOT, "val")
    assert (len(train), len(val)) == (367, 101)
    check_samples(val, fmt, deep=True, desc="camvid val")
    values = set()
    for sample in train[::25]:
        values |= set(np.unique(fmt.load_mask(sample.mask)).tolist())
    assert values <= set(range(11)) | {255} and 255 in values


def test_load_mask_rejects_colour_and_garbage(tmp_path):
    fmt = get_format("folder", num_classes=6)
    rgb = save_image(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*single-channel"):
        fmt.load_mask(rgb)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"garbage\.png: cannot read mask"):
        fmt.load_mask(garbage)
    with pytest.raises(DataError, match=r"absent\.png: mask file does not exist"):
        fmt.load_mask(tmp_path / "absent.png")


def test_colorize_uses_palette_and_black_ignore():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    image = colorize(mask, ((10, 20, 30), (40, 50, 60), (70, 80, 90)))
    assert image.mode == "P"
    rgb = np.array(image.convert("RGB"))
    assert rgb[0, 1].tolist() == [40, 50, 60] and rgb[1, 0].tolist() == [70, 80, 90]
    assert rgb[1, 1].tolist() == [0, 0, 0]


# ---------------------------------------------------------------- split lists


def test_split_round_trip(tmp_path):
    samples = folder_dataset(tmp_path)
    unlabeled = [Sample(s.image, None) for s in samples[2:]]
    path = tmp_path / "splits" / "1_2" / "labeled.txt"
    write_split(path, samples[:2] + unlabeled, tmp_path)
    lines = path.read_text().splitlines()
    assert lines[0] == "images/train/000.png masks/train/000.png"
    assert lines[2] == "images/train/002.png"
    assert [p.name for p in path.parent.iterdir()] == ["labeled.txt"]  # no temp files left
    assert read_split(path, tmp_path, require_mask=False) == samples[:2] + unlabeled
    with pytest.raises(DataError, match=r"labeled\.txt:3: no mask path"):
        read_split(path, tmp_path, require_mask=True)


def test_read_split_ignores_comments_and_blank_lines(tmp_path):
    samples = folder_dataset(tmp_path, count=2)
    path = tmp_path / "list.txt"
    path.write_text("# UniMatch split\n\nimages/train/000.png masks/train/000.png\n  \n")
    assert read_split(path, tmp_path, require_mask=True) == samples[:1]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("# nothing here\n\n", r"list\.txt: split list has no samples"),
        ("images/train/000.png masks/train/000.png extra\n", r"list\.txt:1: .*3 fields.*spaces"),
        (
            "images/train/000.png\nimages/train/404.png\n",
            r"list\.txt:2: image .*404\.png does not exist",
        ),
        (
            "images/train/000.png masks/train/404.png\n",
            r"list\.txt:1: mask .*404\.png does not exist",
        ),
    ],
)
def test_read_split_errors(tmp_path, content, pattern):
    folder_dataset(tmp_path, count=1)
    path = tmp_path / "list.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_split(path, tmp_path, require_mask=False)


def test_read_split_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: split list does not exist"):
        read_split(tmp_path / "nope.txt", tmp_path, require_mask=True)


def fake_samples(count: int) -> list[Sample]:
    return [Sample(Path(f"/data/{i:03d}.jpg"), Path(f"/data/{i:03d}.png")) for i in range(count)]


def test_make_split_reproducible_disjoint_and_ordered():
    samples = fake_samples(40)
    labeled, unlabeled = make_split(samples, fraction=1 / 8, seed=3)
    assert len(labeled) == 5 and len(unlabeled) == 35
    assert (labeled, unlabeled) == make_split(samples, fraction=1 / 8, seed=3)
    assert not set(labeled) & set(unlabeled) and set(labeled) | set(unlabeled) == set(samples)
    assert labeled == sorted(labeled, key=samples.index)
    assert unlabeled == sorted(unlabeled, key=samples.index)
    assert make_split(samples, fraction=1 / 8, seed=4)[0] != labeled
    assert len(make_split(samples, count=7)[0]) == 7
    assert len(make_split(fake_samples(3), fraction=0.01)[0]) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"fraction": 0.5, "count": 3},
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"count": 0},
        {"count": 41},
    ],
)
def test_make_split_rejects_bad_arguments(kwargs):
    with pytest.raises(DataError):
        make_split(fake_samples(40), **kwargs)


def test_parse_fraction():
    assert parse_fraction("1/8") == parse_fraction("1_8") == parse_fraction("0.125") == 0.125
    assert parse_fraction(" 1 ") == 1.0
    for bad in ("0", "732", "abc", "1/0", "-1/4"):
        with pytest.raises(DataError):
            parse_fraction(bad)


# ---------------------------------------------------------------- dataset


@pytest.fixture
def dataset(tmp_path) -> SegmentationDataset:
    samples = folder_dataset(tmp_path)
    return SegmentationDataset(samples, get_format("folder", root=tmp_path), TrainTransform(8))


def test_dataset_item(dataset):
    item = dataset[1]
    assert set(item) == {"image", "mask", "index", "name"}
    assert item["image"].shape == (3, 8, 8) and item["mask"].shape == (8, 8)
    assert item["index"] == 1 and item["name"] == "001"
    assert dataset[-1]["index"] == 3
    with pytest.raises(IndexError):
        dataset[4]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["name"] == ["000", "001"]


def test_dataset_seeded_items_are_reproducible(dataset):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = dataset[(2, 7)], dataset[(2, 7)], dataset[(2, 8)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], other["image"])
    torch.manual_seed(5)
    unseeded = dataset[2]
    torch.manual_seed(5)
    assert torch.equal(dataset[2]["image"], unseeded["image"])  # plain indices use the global RNG


def test_dataset_cache_reads_each_file_once(tmp_path):
    samples = folder_dataset(tmp_path)
    fmt = get_format("folder", root=tmp_path)
    plain = SegmentationDataset(samples, fmt, TrainTransform(8))
    cached = SegmentationDataset(samples, fmt, TrainTransform(8), cache=True)
    first = cached[(1, 3)]
    samples[1].image.unlink()
    samples[1].mask.unlink()
    # The files are gone: the second read comes from memory and is the same sample.
    again, expected = cached[(1, 3)], plain[(0, 3)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert expected["image"].shape == again["image"].shape
    with pytest.raises(DataError, match=r"001\.png"):
        plain[(1, 3)]


def test_dataset_without_mask(tmp_path):
    samples = [Sample(s.image, None) for s in folder_dataset(tmp_path)]
    unlabeled = SegmentationDataset(samples, get_format("folder"), EvalTransform(), with_mask=False)
    assert set(unlabeled[0]) == {"image", "index", "name"}
    labeled = SegmentationDataset(samples, get_format("folder"), EvalTransform())
    with pytest.raises(DataError, match=r"000\.png: sample has no mask"):
        labeled[0]


def test_dataset_bad_files(tmp_path):
    samples = folder_dataset(tmp_path)
    fmt = get_format("folder", root=tmp_path)
    samples[0].image.unlink()
    save_mask(samples[1].mask, random_labels(height=10, width=16))
    labels = random_labels()
    labels[3, 4] = 7
    save_mask(samples[2].mask, labels)
    samples[3].image.write_bytes(b"\x89PNG garbage")
    dataset = SegmentationDataset(samples, fmt, EvalTransform())
    with pytest.raises(DataError, match=r"000\.png: image file does not exist"):
        dataset[0]
    with pytest.raises(
        DataError, match=r"masks/train/001\.png: mask is 16x10 .*images/train/001\.png is 16x12"
    ):
        dataset[1]
    with pytest.raises(DataError, match=r"masks/train/002\.png: label values \[7\]"):
        dataset[2]
    with pytest.raises(DataError, match=r"images/train/003\.png: cannot read image"):
        dataset[3]


def test_check_samples_reports_all_problems(tmp_path):
    samples = folder_dataset(tmp_path, count=3)
    fmt = get_format("folder", root=tmp_path)
    check_samples(samples, fmt, deep=True)
    labels = random_labels()
    labels[0, 0] = 7
    save_mask(samples[0].mask, labels)
    check_samples(samples, fmt, deep=False)  # label values need decoding: deep only
    save_mask(samples[1].mask, random_labels(height=5))
    samples[2].image.write_bytes(b"not an image")
    missing = [Sample(tmp_path / f"gone{i}.png", None) for i in range(10)]
    with pytest.raises(DataError) as error:
        check_samples(samples + missing, fmt, deep=True, desc="train")
    message = str(error.value)
    assert message.startswith("train: 13 problem(s) in 13 samples")
    assert "label values [7]" in message and "mask is 16x5" in message
    assert "images/train/002.png: cannot read image" in message
    assert "gone0.png: image file does not exist" in message and "and 3 more" in message


def test_masks_of_only_0_and_255_are_refused_with_the_fix(tmp_path):
    # A binary dataset saved as black / white: 255 is the ignore index, so without this
    # check the foreground would silently never be trained or scored.
    samples = folder_dataset(tmp_path, count=2)
    (tmp_path / "classes.txt").write_text("background\nlesion\n")
    fmt = get_format("folder", root=tmp_path)
    for sample in samples:
        save_mask(sample.mask, np.where(random_labels(num_classes=2) == 1, 255, 0))
    with pytest.raises(DataError) as error:
        check_samples(samples, fmt, deep=True, desc="check labeled")
    message = str(error.value)
    assert message.startswith("check labeled: every mask holds only the values 0 and 255")
    assert "masks/train/000.png" in message and "classes 1..1 would never be trained" in message
    save_mask(samples[0].mask, random_labels(num_classes=2))  # one mask with class 1: fine
    check_samples(samples, fmt, deep=True)
    for sample in samples:  # all background: nothing points at a mislabeled class
        save_mask(sample.mask, np.zeros((12, 16), np.uint8))
    check_samples(samples, fmt, deep=True)


# ---------------------------------------------------------------- synthetic scenes


def test_render_scene_is_deterministic():
    image, labels = render_scene(np.random.default_rng(5), 48, 64)
    again, labels_again = render_scene(np.random.default_rng(5), 48, 64)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and labels.shape == (48, 64)
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)


def test_synthetic_dataset_written_and_long_tailed(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", num_train=24, num_val=4)
    fmt = get_format("folder", root=root)
    assert fmt.num_classes == 6
    train = read_split(root / "splits" / "train.txt", root, require_mask=True)
    val = read_split(root / "splits" / "val.txt", root, require_mask=True)
    assert (len(train), len(val)) == (24, 4)
    assert fmt.list_samples(root, "train") == train
    check_samples(train + val, fmt, deep=True)
    counts = sum(np.bincount(fmt.load_mask(s.mask).ravel(), minlength=6) for s in train)
    assert counts.min() > 0 and counts.max() > 10 * counts.min()
    assert json.loads((root / "synthetic.json").read_text())["complete"] is True


def test_synthetic_dataset_is_idempotent_and_regenerates(tmp_path):
    root = tmp_path / "syn"
    make_synthetic_dataset(root, num_train=6, num_val=2, size=(32, 48))
    image = root / "images" / "train" / "0000.png"
    before = image.stat().st_mtime_ns
    os.utime(image, ns=(before - 10**9, before - 10**9))
    make_synthetic_dataset(root, num_train=6, num_val=2, size=(32, 48))
    assert image.stat().st_mtime_ns == before - 10**9  # untouched
    make_synthetic_dataset(root, num_train=4, num_val=2, size=(32, 48))
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == [
        f"000{i}.png" for i in range(4)
    ]
    meta = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**meta, "complete": False}))  # a killed run
    make_synthetic_dataset(root, num_train=4, num_val=2, size=(32, 48))
    assert json.loads((root / "synthetic.json").read_text())["complete"] is True


def test_synthetic_dataset_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not made by make_synthetic_dataset"):
        make_synthetic_dataset(tmp_path, num_train=2, num_val=1)


def test_deferred_items_augmented_on_the_device_equal_the_loaders_batch(tmp_path):
    from torch.utils.data import default_collate

    from semiseg.data.dataset import augment_on_device, collate_deferred
    from semiseg.data.transforms import UnlabeledTransform

    samples = folder_dataset(tmp_path)
    fmt = get_format("folder", root=tmp_path)

    def boxes(index: int, size: tuple[int, int]) -> torch.Tensor:
        bits = torch.zeros(size, dtype=torch.int64)
        bits[: size[0] // 2, index:] = 1
        return bits

    transform = UnlabeledTransform(TrainTransform(8, scale_range=(0.5, 1.5)), cutmix_p=1.0)
    keys = [(0, 11), (2, 12), (1, 13)]
    loaders = SegmentationDataset(samples, fmt, transform, detections=boxes)
    deferred = SegmentationDataset(samples, fmt, transform, detections=boxes, defer=True)
    item = deferred[keys[0]]
    assert item["image"].dtype == torch.uint8 and item["seed"] == 11
    assert set(item) == {"image", "mask", "detections", "seed", "index", "name"}
    expected = default_collate([loaders[k] for k in keys])
    got = augment_on_device(collate_deferred([deferred[k] for k in keys]), transform, "cpu")
    assert got.keys() == expected.keys()
    assert {"strong1", "box2", "valid", "oracle_mask", "detections"} <= got.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
    with pytest.raises(TypeError, match="needs \\(index, seed\\) keys"):
        deferred[0]
