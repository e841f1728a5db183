"""Data layer: dataset formats, split lists, datasets, transforms and synthetic scenes."""

from semiseg.data.dataset import SegmentationDataset, check_samples, load_image
from semiseg.data.formats import (
    FORMAT_NAMES,
    IGNORE_INDEX,
    DataError,
    DatasetFormat,
    Sample,
    colorize,
    get_format,
    read_class_names,
)
from semiseg.data.splits import make_split, parse_fraction, read_split, write_split
from semiseg.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset, render_scene
from semiseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    StrongTransform,
    TrainTransform,
    cutmix_box,
    denormalize,
    normalize,
)

__all__ = [
    "FORMAT_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASSES",
    "DataError",
    "DatasetFormat",
    "EvalTransform",
    "Sample",
    "SegmentationDataset",
    "StrongTransform",
    "TrainTransform",
    "check_samples",
    "colorize",
    "cutmix_box",
    "denormalize",
    "get_format",
    "load_image",
    "make_split",
    "make_synthetic_dataset",
    "normalize",
    "parse_fraction",
    "read_class_names",
    "read_split",
    "render_scene",
    "write_split",
]
