"""A map-style dataset of image/mask files, and up-front validation of sample lists."""

import operator
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from tqdm import tqdm

from semiseg.data.formats import IGNORE_INDEX, DataError, DatasetFormat, Sample, file_errors
from semiseg.data.splits import problem_report

Transform = Callable[[tv_tensors.Image, tv_tensors.Mask | None], dict[str, torch.Tensor]]

_PROGRESS_MIN_SAMPLES = 200


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB (PIL image, size W x H)."""
    with file_errors(path, "image"), Image.open(path) as img:
        return img.convert("RGB")


def _header_size(path: Path, what: str) -> tuple[int, int]:
    """(W, H) from the file header; verify() also catches corrupt PNG chunks cheaply."""
    with file_errors(path, what), Image.open(path) as img:
        size = img.size
        img.verify()
    return size


def _decoded_size(path: Path, what: str) -> tuple[int, int]:
    """(W, H) of a fully decoded image: a truncated JPEG only fails here, not in its header."""
    with file_errors(path, what), Image.open(path) as img:
        img.load()
        return img.size


def _label_values(labels: np.ndarray) -> list[int]:
    """The distinct values of a uint8 label map, ascending."""
    return [int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=256))]


def _mask_problem(
    labels: np.ndarray,
    values: list[int],
    image_size: tuple[int, int],
    sample: Sample,
    num_classes: int | None,
) -> str | None:
    """Why labels [H, W] (holding `values`) cannot go with an image of size (W, H), or None
    if they can."""
    height, width = labels.shape
    if (width, height) != image_size:
        return (
            f"{sample.mask}: mask is {width}x{height} (WxH) but image {sample.image} "
            f"is {image_size[0]}x{image_size[1]}"
        )
    if num_classes is None:
        return None
    bad = [v for v in values if num_classes <= v != IGNORE_INDEX]
    if bad:
        return (
            f"{sample.mask}: label values {bad[:10]} are outside 0..{num_classes - 1} "
            f"and not the ignore index {IGNORE_INDEX}"
        )
    return None


class SegmentationDataset(torch.utils.data.Dataset):
    """Images (and masks) of `samples`, read through `fmt` and passed to `transform`.

    `dataset[i]` draws augmentation from torch's global RNG; `dataset[(i, seed)]` makes
    it a function of `seed` alone, leaving the caller's RNG state untouched. Items are
    `transform(image, mask)` (image uint8 [3, H, W], mask int64 [H, W] or None) plus
    'index' (int) and 'name' (image file stem). With `detections(index, (H, W))` (a detector
    box bitmask int64 [H, W] per image) the transform also gets `detections=`. With `cache`,
    each decoded image and mask is kept in memory after its first read, so later epochs
    augment from memory; every loader worker holds its own copy.

    With `defer`, an item is the decoded sample untransformed, for `augment_on_device`:
    'image' uint8 [3, H, W], 'mask' int64 [H, W] (when read), 'detections' (when given) and
    'seed', plus 'index' and 'name'; keys must then carry a seed. Batch them with
    `collate_deferred`.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        fmt: DatasetFormat,
        transform: Transform,
        with_mask: bool = True,
        detections: Callable[[int, tuple[int, int]], torch.Tensor] | None = None,
        cache: bool = False,
        defer: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.defer = defer
        self.fmt = fmt
        self.transform = transform
        self.with_mask = with_mask
        self.detections = detections
        self.cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int | str]:
        index, seed = self._parse_key(key)
        sample = self.samples[index]
        pixels, labels = self._decoded(index)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
        mask = None
        if labels is not None:
            mask = tv_tensors.Mask(torch.from_numpy(labels.astype(np.int64)))
        extra = {}
        if self.detections is not None:
            extra["detections"] = self.detections(index, tuple(pixels.shape[:2]))
        if self.defer:
            if seed is None:
                raise TypeError(f"a deferred dataset needs (index, seed) keys, got {key!r}")
            out = {"image": image, "seed": seed, **extra}
            if mask is not None:
                out["mask"] = mask
        else:
            out = dict(transform_sample(self.transform, image, mask, seed, **extra))
        out["index"] = index
        out["name"] = sample.image.stem
        return out

    def _parse_key(self, key: int | tuple[int, int]) -> tuple[int, int | None]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"dataset key must be an index or (index, seed), got {key!r}")
            index, seed = operator.index(key[0]), operator.index(key[1])
        else:
            index, seed = operator.index(key), None
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return index % len(self), seed

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(RGB uint8 [H, W, 3], labels uint8 [H, W] or None) of sample `index`."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        sample = self.samples[index]
        pil_image = load_image(sample.image)
        labels = self._load_labels(sample, pil_image.size) if self.with_mask else None
        decoded = np.array(pil_image), labels
        if self.cache is not None:
            self.cache[index] = decoded
        return decoded

    def _load_labels(self, sample: Sample, image_size: tuple[int, int]) -> np.ndarray:
        if sample.mask is None:
            raise DataError(f"{sample.image}: sample has no mask, but this dataset needs masks")
        labels = self.fmt.load_mask(sample.mask)
        problem = _mask_problem(
            labels, _label_values(labels), image_size, sample, self.fmt.num_classes
        )
        if problem:
            raise DataError(problem)
        return labels


def transform_sample(
    transform: Transform,
    image: tv_tensors.Image,
    mask: tv_tensors.Mask | None,
    seed: int | None,
    **extra: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """`transform(image, mask, **extra)`, its draws a function of `seed` alone when given
    (the caller's RNG state is left as it was)."""
    if seed is None:
        return transform(image, mask, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image, mask, **extra)


def collate_deferred(items: list[dict]) -> dict:
    """A batch of deferred items: lists of the (differently sized) tensors and seeds, 'index'
    as a tensor, 'name' as a list."""
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["index"] = torch.tensor(batch["index"])
    return batch


def augment_on_device(batch: dict, transform: Transform, device: torch.device) -> dict:
    """Transform a `collate_deferred` batch where the model is: each sample moved to `device`
    and passed to `transform` with its own seed, as the loader workers would on the CPU (same
    ops, same draws: on the CPU the batch is identical), then stacked. For many runs sharing
    one GPU, whose CPU cores cannot keep up with their loaders (a UniMatch sample's strong
    views cost about 50 ms of CPU; its geometric crops 3-9 ms)."""
    outs = []
    for i, image in enumerate(batch["image"]):
        mask = batch["mask"][i].to(device, non_blocking=True) if "mask" in batch else None
        extra = {}
        if "detections" in batch:
            extra["detections"] = batch["detections"][i].to(device, non_blocking=True)
        outs.append(
            transform_sample(
                transform,
                tv_tensors.Image(image.to(device, non_blocking=True)),
                None if mask is None else tv_tensors.Mask(mask),
                batch["seed"][i],
                **extra,
            )
        )
    # Views the transform makes on the CPU (CutMix boxes) move as one batch: each copy from
    # host memory waits for the work queued on the device.
    out = {key: torch.stack([o[key] for o in outs]).to(device) for key in outs[0]}
    out["index"], out["name"] = batch["index"], batch["name"]
    return out


def _sample_problems(sample: Sample, fmt: DatasetFormat, deep: bool, values: set[int]) -> list[str]:
    """Why `sample` cannot be used (empty if it can); a deep check adds its mask's label
    values to `values`."""
    try:
        image_size = (
            _decoded_size(sample.image, "image") if deep else _header_size(sample.image, "image")
        )
        if sample.mask is None:
            return []
        if not deep:
            mask_size = _header_size(sample.mask, "mask")
            if mask_size == image_size:
                return []
            return [
                f"{sample.mask}: mask is {mask_size[0]}x{mask_size[1]} (WxH) but image "
                f"{sample.image} is {image_size[0]}x{image_size[1]}"
            ]
        labels = fmt.load_mask(sample.mask)
        present = _label_values(labels)
        values.update(present)
        problem = _mask_problem(labels, present, image_size, sample, fmt.num_classes)
    except DataError as err:
        return [str(err)]
    return [problem] if problem else []


def check_samples(
    samples: Sequence[Sample],
    fmt: DatasetFormat,
    *,
    deep: bool,
    desc: str = "",
    progress: bool = True,
) -> None:
    """Validate samples before training: files exist, image headers read, mask sizes match.

    With `deep`, every image and mask is decoded (a truncated JPEG or PNG fails here, not in
    the middle of a run), mask values are checked against fmt.num_classes, and masks that
    together hold only 0 and 255 are refused (a binary dataset saved black and white, whose
    foreground would be ignored). Raises one DataError listing up to 10 problems and
    counting the rest.
    """
    bar = tqdm(
        samples,
        desc=desc or "checking samples",
        leave=False,
        unit="sample",
        disable=not progress or len(samples) < _PROGRESS_MIN_SAMPLES,
    )
    problems: list[str] = []
    values: set[int] = set()
    for sample in bar:
        problems.extend(_sample_problems(sample, fmt, deep, values))
    if problems:
        raise DataError(problem_report(desc or "samples", problems, len(samples)))
    if fmt.num_classes and fmt.num_classes > 1 and values == {0, IGNORE_INDEX}:
        example = next(s.mask for s in samples if s.mask is not None)
        raise DataError(
            f"{desc or 'samples'}: every mask holds only the values 0 and {IGNORE_INDEX} "
            f"(e.g. {example}), but {IGNORE_INDEX} is the ignore index: classes "
            f"1..{fmt.num_classes - 1} would never be trained or scored. If {IGNORE_INDEX} marks "
            f"your foreground, save the masks with class indices (0 and 1 for two classes): "
            f"np.where(mask == {IGNORE_INDEX}, 1, 0), as an 8-bit PNG."
        )
