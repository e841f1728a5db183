"""Synthetic street-like scenes with a long-tailed class distribution.

Used by the tests and the quickstart: a small CNN learns them within minutes on a CPU,
but not trivially. Classes have very unequal pixel shares (ground and sky dominate,
poles and signs are rare, as in Cityscapes and CamVid), colours carry noise, a
colour cast and an illumination gradient, and 'car' and 'sign' share a red base
colour so that only texture (dots vs stripes) and shape tell them apart.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.data.formats import DataError, Sample
from semiseg.data.splits import atomic_write_text, write_split

SYNTHETIC_CLASSES: tuple[str, ...] = ("ground", "sky", "building", "car", "pole", "sign")
GROUND, SKY, BUILDING, CAR, POLE, SIGN = range(len(SYNTHETIC_CLASSES))

_BASE_COLOURS = np.array(
    [
        (105, 100, 85),  # ground
        (125, 165, 215),  # sky
        (150, 95, 75),  # building
        (185, 55, 50),  # car: red, dotted
        (80, 85, 95),  # pole
        (195, 60, 55),  # sign: nearly the car's red, striped
    ],
    dtype=np.float32,
)

_META_FILE = "synthetic.json"
_META_VERSION = 1
_MIN_SIZE = 16


def render_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [H, W, 3], labels uint8 [H, W] indices into SYNTHETIC_CLASSES)."""
    labels = _layout(rng, height, width)
    return _paint(rng, labels), labels


def _layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sky above a horizon, ground below, then buildings, cars, poles and signs on top."""
    labels = np.full((height, width), GROUND, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.3, 0.5))
    labels[:horizon] = SKY
    for _ in range(rng.integers(1, 4)):
        box_w = max(2, int(width * rng.uniform(0.15, 0.35)))
        box_h = max(2, int(height * rng.uniform(0.15, 0.4)))
        left = rng.integers(0, width - box_w + 1)
        bottom = horizon + int(rng.integers(0, max(1, height // 12)))
        labels[max(0, bottom - box_h) : bottom, left : left + box_w] = BUILDING
    for _ in range(rng.integers(0, 4)):
        box_w = max(3, int(width * rng.uniform(0.12, 0.22)))
        box_h = max(2, int(height * rng.uniform(0.08, 0.14)))
        bottom = rng.integers(min(height, horizon + box_h), height + 1)
        left = rng.integers(0, width - box_w + 1)
        labels[bottom - box_h : bottom, left : left + box_w] = CAR
    for _ in range(rng.integers(0, 4)):
        _draw_pole(rng, labels, horizon)
    return labels


def _draw_pole(rng: np.random.Generator, labels: np.ndarray, horizon: int) -> None:
    """A thin vertical pole standing on the ground, usually carrying a small sign."""
    height, width = labels.shape
    pole_w = int(rng.integers(1, 3))
    bottom = int(rng.integers(horizon, max(horizon + 1, int(height * 0.85))))
    top = max(0, bottom - int(height * rng.uniform(0.25, 0.45)))
    x = int(rng.integers(0, width - pole_w + 1))
    labels[top:bottom, x : x + pole_w] = POLE
    if rng.random() < 0.7:
        side = int(rng.integers(4, 8))
        sign_x = max(0, x + pole_w // 2 - side // 2)
        sign_y = max(0, top - side // 2)
        labels[sign_y : sign_y + side, sign_x : sign_x + side] = SIGN


def _textures(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Per-class brightness offsets, float32 [num_classes, H, W]."""
    yy, xx = np.mgrid[0:height, 0:width]
    yy = yy + rng.integers(0, 8)  # random phase so stripes do not sit at fixed rows
    xx = xx + rng.integers(0, 8)
    blotches = np.kron(rng.normal(0, 14, (height // 8 + 1, width // 8 + 1)), np.ones((8, 8)))
    ground = blotches[:height, :width] + rng.normal(0, 6, (height, width))
    sky = 35 * yy / height - 15
    building = np.where(((yy // 3) % 3 == 0) | ((xx // 3) % 4 == 0), -35, 10)
    car = np.where((yy % 4 < 2) & (xx % 4 < 2), 40, -10)
    pole = np.zeros((height, width))
    sign = np.where((yy // 2) % 2 == 0, 40, -20)
    return np.stack([ground, sky, building, car, pole, sign]).astype(np.float32)


def _paint(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Colour a label map: base colour + texture, lit by a gradient, with cast and noise."""
    height, width = labels.shape
    texture = np.take_along_axis(_textures(rng, height, width), labels[None].astype(np.intp), 0)[0]
    image = _BASE_COLOURS[labels] + texture[..., None]
    yy, xx = np.mgrid[0:height, 0:width]
    slope_x, slope_y = rng.uniform(-0.4, 0.4, 2)
    gain = 1 + slope_x * (xx / width - 0.5) + slope_y * (yy / height - 0.5)
    image = image * gain[..., None] + rng.normal(0, 8, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_synthetic_dataset(
    root: Path,
    *,
    num_train: int = 200,
    num_val: int = 50,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the 'folder' layout under `root` and return `root`.

    Layout: images/{train,val}/NNNN.png (RGB), masks/{train,val}/NNNN.png (L, class
    indices), classes.txt, splits/{train,val}.txt and synthetic.json. Does nothing if
    `root` already holds a complete dataset made with the same parameters.
    """
    root = Path(root)
    params = _check_params(num_train, num_val, size, seed)
    if _is_complete(root, params):
        return root
    _claim(root, params)
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        samples = _write_scenes(root, split, count, size, (seed, split_id))
        write_split(root / "splits" / f"{split}.txt", samples, root)
    atomic_write_text(root / "classes.txt", "".join(f"{name}\n" for name in SYNTHETIC_CLASSES))
    # Written last: only a finished run marks the dataset complete.
    atomic_write_text(root / _META_FILE, json.dumps({**params, "complete": True}, indent=2))
    return root


def _check_params(num_train: int, num_val: int, size: tuple[int, int], seed: int) -> dict:
    if num_train < 1 or num_val < 1:
        raise DataError(f"need at least one train and one val image, got {num_train}, {num_val}")
    if len(size) != 2 or min(size) < _MIN_SIZE:
        raise DataError(f"size must be (height, width) with both >= {_MIN_SIZE}, got {size!r}")
    if seed < 0:
        raise DataError(f"seed must be non-negative, got {seed}")
    return {
        "version": _META_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size": [int(size[0]), int(size[1])],
        "seed": int(seed),
    }


def _file_names(count: int) -> list[str]:
    digits = max(4, len(str(count - 1)))
    return [f"{i:0{digits}d}.png" for i in range(count)]


def _is_complete(root: Path, params: dict) -> bool:
    try:
        meta = json.loads((root / _META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if meta != {**params, "complete": True}:
        return False
    expected = [root / "classes.txt", root / "splits" / "train.txt", root / "splits" / "val.txt"]
    for split in ("train", "val"):
        for name in _file_names(params[f"num_{split}"]):
            expected += [root / "images" / split / name, root / "masks" / split / name]
    return all(path.is_file() for path in expected)


def _claim(root: Path, params: dict) -> None:
    """Mark `root` as ours and incomplete; refuse folders holding someone else's files."""
    if root.is_dir() and any(root.iterdir()) and not (root / _META_FILE).is_file():
        raise DataError(
            f"{root}: folder is not empty and was not made by make_synthetic_dataset "
            f"(no {_META_FILE}); use an empty or new folder"
        )
    atomic_write_text(root / _META_FILE, json.dumps({**params, "complete": False}, indent=2))


def _write_scenes(
    root: Path, split: str, count: int, size: tuple[int, int], seed: tuple[int, int]
) -> list[Sample]:
    """Render `count` scenes into images/<split> and masks/<split>; drop stale scene files."""
    image_dir, mask_dir = root / "images" / split, root / "masks" / split
    names = _file_names(count)
    for folder in (image_dir, mask_dir):
        folder.mkdir(parents=True, exist_ok=True)
        # A previous, larger dataset may have left scenes the folder format would pick up.
        for stale in set(p.name for p in folder.glob("*.png")) - set(names):
            (folder / stale).unlink()
    samples = []
    for index, name in enumerate(names):
        # One generator per scene: any scene can be regenerated alone.
        image, labels = render_scene(np.random.default_rng([*seed, index]), *size)
        Image.fromarray(image).save(image_dir / name, compress_level=1)
        Image.fromarray(labels).save(mask_dir / name, compress_level=1)
        samples.append(Sample(image_dir / name, mask_dir / name))
    return samples
