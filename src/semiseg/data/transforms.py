"""Augmentations for segmentation: image and mask transformed together.

All randomness is drawn from torch's global RNG (or an explicit generator for
`cutmix_box`), so that `SegmentationDataset[(index, seed)]` is reproducible. Images
travel as `tv_tensors.Image` uint8 [3, H, W] and masks as `tv_tensors.Mask` int64
[H, W] until `normalize` turns the image into a float tensor.
"""

import functools
import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EVAL_MODES = ("none", "resize", "sliding")
_ORACLE_VOID = 1000  # stand-in for a void label while the padding is being tracked
_DETECTION_SHIFT = 1024  # detector bits sit above every label value in the tracking marker
_STAND_IN = torch.zeros(3, 1, 1, dtype=torch.uint8)

ImageAndMask = tuple[tv_tensors.Image, tv_tensors.Mask | None]


# Kept per device: building them on a GPU is a copy from host memory that waits for the work
# already queued, and `augment_on_device` normalises every view of every sample.
@functools.cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return mean, std


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 [..., 3, H, W] with ImageNet mean and std."""
    if image.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 image, got {image.dtype}")
    mean, std = _stats(image.device)
    return (image.as_subclass(torch.Tensor).float() / 255 - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: float [..., 3, H, W] -> uint8 [..., 3, H, W] (for viewing)."""
    mean, std = _stats(image.device)
    pixels = (image.as_subclass(torch.Tensor) * std + mean) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8)


def _size_pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return pair


def _uniform(low: float, high: float, generator: torch.Generator | None = None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


class TrainTransform:
    """Weak augmentation of UniMatch and most semi-supervised segmentation papers.

    Rescale the whole image by a factor uniform in `scale_range` (image bilinear, mask
    nearest), pad right and bottom to at least the crop (image 0, mask `ignore_index`),
    crop at a random position, flip horizontally with probability 0.5.

    DARS' training adds, each with probability 0.5, a rotation by an angle uniform in
    [-rotate, rotate] degrees after the rescale (image bilinear with the ImageNet mean
    outside, mask nearest with `ignore_index`) and a 5 x 5 Gaussian blur of the image
    (sigma 1.1, OpenCV's for that kernel); both off by default, and then draw nothing.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = 255,
        rotate: float = 0.0,
        blur: bool = False,
    ) -> None:
        self.crop_size = _size_pair(crop_size, "crop_size")
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range!r}")
        self.scale_range = (float(low), float(high))
        self.hflip = hflip
        self.ignore_index = ignore_index
        if rotate < 0:
            raise ValueError(f"rotate must be >= 0 degrees, got {rotate}")
        self.rotate = float(rotate)
        self.blur = blur

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """image uint8 [3, H, W], mask int64 [H, W] or None ->
        {'image': float [3, h, w] normalised, 'mask': int64 [h, w]} (no 'mask' if None)."""
        image, mask = self.geometric(image, mask)
        if self.blur and torch.rand(()) < 0.5:
            image = F.gaussian_blur(image, [5, 5], [1.1, 1.1])
        out = {"image": normalize(image)}
        if mask is not None:
            out["mask"] = mask.as_subclass(torch.Tensor).long()
        return out

    def geometric(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> ImageAndMask:
        """The random rescale, pad, crop and flip, without normalising.

        image uint8 [3, H, W], mask [H, W] or None -> uint8 [3, h, w] and mask [h, w],
        (h, w) = crop_size. Unlabeled pipelines apply photometric ops to this output;
        passing a zero mask for an unlabeled image yields its padding as `ignore_index`.
        """
        if image.dtype != torch.uint8:
            raise ValueError(f"TrainTransform expects a uint8 image, got {image.dtype}")
        image = tv_tensors.Image(image)
        mask = None if mask is None else tv_tensors.Mask(mask)
        image, mask = self._rescale(image, mask)
        if self.rotate and torch.rand(()) < 0.5:
            image, mask = self._rotate(image, mask)
        image, mask = self._pad(image, mask)
        image, mask = self._crop(image, mask)
        if self.hflip and torch.rand(()) < 0.5:
            image = F.horizontal_flip(image)
            mask = None if mask is None else F.horizontal_flip(mask)
        return image, mask

    def _rescale(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None) -> ImageAndMask:
        factor = _uniform(*self.scale_range)
        height, width = image.shape[-2:]
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        if size == [height, width]:
            return image, mask
        image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if mask is not None:
            # nearest-exact samples pixel centres like bilinear does; plain 'nearest'
            # would shift the mask by up to half a pixel against the image.
            mask = F.resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)
        return image, mask

    def _rotate(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None) -> ImageAndMask:
        angle = _uniform(-self.rotate, self.rotate)
        mean = [round(255 * m) for m in IMAGENET_MEAN]
        image = F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=mean)
        if mask is not None:
            mask = F.rotate(
                mask, angle, interpolation=InterpolationMode.NEAREST, fill=self.ignore_index
            )
        return image, mask

    def _pad(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None) -> ImageAndMask:
        height, width = image.shape[-2:]
        pad_h = max(self.crop_size[0] - height, 0)
        pad_w = max(self.crop_size[1] - width, 0)
        if pad_h == 0 and pad_w == 0:
            return image, mask
        padding = [0, 0, pad_w, pad_h]  # left, top, right, bottom
        image = F.pad(image, padding, fill=0)
        if mask is not None:
            mask = F.pad(mask, padding, fill=self.ignore_index)
        return image, mask

    def _crop(self, image: tv_tensors.Image, mask: tv_tensors.Mask | None) -> ImageAndMask:
        height, width = image.shape[-2:]
        crop_h, crop_w = self.crop_size
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        image = F.crop(image, top, left, crop_h, crop_w)
        if mask is not None:
            mask = F.crop(mask, top, left, crop_h, crop_w)
        return image, mask


def _check_probability(p: float, name: str) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


class StrongTransform:
    """UniMatch's strong photometric augmentation of a uint8 image [3, H, W] (image only).

    Colour jitter (0.5, 0.5, 0.5, 0.25) with p=0.8, grayscale with p=0.2, Gaussian blur
    with sigma uniform in [0.1, 2.0] with p=0.5. Returns uint8 [3, H, W].
    """

    def __init__(
        self,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        for value, name in (
            (jitter_p, "jitter_p"),
            (grayscale_p, "grayscale_p"),
            (blur_p, "blur_p"),
        ):
            _check_probability(value, name)
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma!r}")
        self.jitter = v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=jitter_p)
        self.grayscale = v2.RandomGrayscale(p=grayscale_p)
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise ValueError(f"StrongTransform expects a uint8 image, got {image.dtype}")
        image = self.grayscale(self.jitter(image))
        if torch.rand(()) < self.blur_p:
            image = _gaussian_blur(image, _uniform(*self.blur_sigma))
        return image


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with a kernel of +-3 sigma, shrunk where the image is too small to reflect-pad."""
    radius = min(math.ceil(3 * sigma), min(image.shape[-2:]) - 1)
    if radius < 1:
        return image
    return F.gaussian_blur(image, [2 * radius + 1] * 2, [sigma, sigma])


def cutmix_box(
    height: int,
    width: int,
    p: float = 0.5,
    size_min: float = 0.02,
    size_max: float = 0.4,
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
    count: int = 1,
    side: tuple[float, float] | None = None,
    area: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The CutMix region: bool [H, W], True inside the box(es) to paste.

    UniMatch's (the default): with probability p, a box whose area is a fraction uniform
    in [size_min, size_max] of the image and whose height/width ratio is uniform in
    `ratio`, placed uniformly where it fits entirely; otherwise all False. UniMatch finds
    the position by rejection sampling; drawing it among the valid positions always
    terminates, also for images much wider than tall.

    `count` > 1 pastes the union of that many boxes, and `side` = (lo, hi) draws each box's
    height and width as independent fractions uniform in [lo, hi] of the image's instead of
    by area and ratio: STPG's "three rectangular regions with random ratios ranging from 0.25
    to 0.5" (Sec. 4.1) is count=3, side=(0.25, 0.5), p=1.

    `area` = (lo, hi) is CPS's box generator (TorchSemiSeg's BoxMaskGenerator, which CPS and
    FPL mix every unlabeled image with: count=3, area=(0.25, 0.5), p=1): per box a fraction p
    uniform in [lo, hi], a random aspect ratio (height fraction p^u with u uniform in [0, 1],
    width fraction p / that), both times sqrt(1 / count), so each box covers p / count of the
    image, placed uniformly inside it; the boxes are XOR-combined (where two overlap, neither
    is pasted). Draws only from `generator` (global RNG if None).
    """
    if height < 1 or width < 1:
        raise ValueError(f"cutmix_box needs a positive size, got {height}x{width}")
    _check_probability(p, "p")
    if not 0 < size_min <= size_max <= 1:
        raise ValueError(f"need 0 < size_min <= size_max <= 1, got {size_min}, {size_max}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if side is not None and not 0 < side[0] <= side[1] <= 1:
        raise ValueError(f"side must satisfy 0 < min <= max <= 1, got {side!r}")
    if area is not None and (side is not None or not 0 < area[0] <= area[1] <= 1):
        raise ValueError(f"area must satisfy 0 < min <= max <= 1 and go without side, got {area!r}")
    box = torch.zeros(height, width, dtype=torch.bool)
    if _uniform(0, 1, generator) >= p:
        return box
    if area is not None:
        return _xor_boxes(box, count, area, generator)
    for _ in range(count):
        if side is None:
            area = _uniform(size_min, size_max, generator) * height * width
            aspect = _uniform(*ratio, generator)
            box_h = min(height, max(1, int(math.sqrt(area * aspect))))
            box_w = min(width, max(1, int(math.sqrt(area / aspect))))
        else:
            box_h = max(1, int(_uniform(*side, generator) * height))
            box_w = max(1, int(_uniform(*side, generator) * width))
        top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
        left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
        box[top : top + box_h, left : left + box_w] = True
    return box


def _xor_boxes(
    box: torch.Tensor, count: int, area: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """CPS's boxes (see `cutmix_box`), toggled into `box`."""
    height, width = box.shape
    shrink = math.sqrt(1.0 / count)
    for _ in range(count):
        share = _uniform(*area, generator)
        height_share = share ** _uniform(0, 1, generator)
        box_h = round(height_share * shrink * height)
        box_w = round(share / height_share * shrink * width)
        top = round((height - box_h) * _uniform(0, 1, generator))
        left = round((width - box_w) * _uniform(0, 1, generator))
        box[top : top + box_h, left : left + box_w] ^= True
    return box


class EvalTransform:
    """Validation preprocessing; the mask always stays at its original resolution.

    mode 'none': the full image; 'resize': image resized (bilinear) so that its shorter
    side is `size` (or to exactly (height, width) if `size` is a pair), and the evaluator
    upsamples logits to the mask size; 'sliding': the full image, with the evaluator
    running windows over it (`size` may record the window size for it).
    """

    def __init__(self, mode: str = "none", size: int | tuple[int, int] | None = None) -> None:
        if mode not in EVAL_MODES:
            raise ValueError(f"EvalTransform mode must be one of {EVAL_MODES}, got {mode!r}")
        if mode == "resize" and size is None:
            raise ValueError("EvalTransform mode 'resize' needs a size")
        if mode == "none" and size is not None:
            raise ValueError("EvalTransform mode 'none' takes no size")
        if size is not None and not isinstance(size, int):
            size = _size_pair(size, "size")
        elif size is not None and size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.mode = mode
        self.size = size

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """image uint8 [3, H, W], mask int64 [H, W] or None ->
        {'image': float [3, h, w] normalised, 'mask': int64 [H, W]} (no 'mask' if None)."""
        if self.mode == "resize":
            size = [self.size] if isinstance(self.size, int) else list(self.size)
            image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        out = {"image": normalize(image)}
        if mask is not None:
            out["mask"] = mask.as_subclass(torch.Tensor).long()
        return out


def eval_transform(mode: str, size: int | None) -> EvalTransform:
    """The validation transform of `data.eval_mode`; `size` (resize target or sliding window)
    is dropped for 'none', which always runs on the full image."""
    return EvalTransform(mode, None if mode == "none" else size)


class UnlabeledTransform:
    """The views of one unlabeled image that the semi-supervised schemes need (UniMatch).

    One weak geometric crop (`TrainTransform.geometric`), up to two independent strong
    photometric versions of that same crop (`strong_views`), up to two CutMix boxes
    (`boxes`), and `valid`, False on the crop's padding (`cutmix_*`: see `cutmix_box`).
    `image` is the weak view the teacher labels. If a mask is given (research diagnostics
    only: `oracle_mask`), it follows the crop but never the training.

    Returns {'image', 'strong1', 'strong2' (those asked for): float [3,h,w] normalised;
    'box1', 'box2' (those asked for), 'valid': bool [h,w]; 'oracle_mask': int64 [h,w] when a
    mask was given; 'detections': int64 [h,w] when a detector box bitmask was given (it
    follows the crop like the mask; 0 on padding)}.
    """

    def __init__(
        self,
        weak: TrainTransform,
        strong: StrongTransform | None = None,
        cutmix_p: float = 0.5,
        cutmix_boxes: int = 1,
        cutmix_side: tuple[float, float] | None = None,
        strong_views: int = 2,
        boxes: int = 2,
        cutmix_area: tuple[float, float] | None = None,
    ) -> None:
        _check_probability(cutmix_p, "cutmix_p")
        if not (0 <= strong_views <= 2 and 0 <= boxes <= 2):
            raise ValueError(
                f"strong_views and boxes must be 0, 1 or 2, got {strong_views} and {boxes}"
            )
        self.weak = weak
        self.strong = strong or StrongTransform()
        self.cutmix = {
            "p": cutmix_p,
            "count": cutmix_boxes,
            "side": cutmix_side,
            "area": cutmix_area,
        }
        self.strong_views, self.boxes = strong_views, boxes

    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        detections: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        height, width = image.shape[-2:]
        ignore = self.weak.ignore_index
        # The crop's padding comes back as ignore_index in the marker. Void pixels of an oracle
        # mask are moved out of the way first, so `valid` depends on the padding alone and no
        # ground truth reaches training. Detector bits ride in the same marker, above the label
        # values (so one nearest-neighbour resampling moves all of them together).
        if mask is None:
            marker = torch.zeros(height, width, dtype=torch.int64, device=image.device)
        else:
            marker = torch.where(
                mask == ignore, _ORACLE_VOID, mask.as_subclass(torch.Tensor).long()
            )
        if detections is not None:
            marker = marker + _DETECTION_SHIFT * detections.as_subclass(torch.Tensor).long()
        crop, marker = self.weak.geometric(image, marker)
        marker = marker.as_subclass(torch.Tensor)
        valid = marker != ignore
        if detections is not None:
            detected = torch.where(valid, marker // _DETECTION_SHIFT, 0)
            marker = torch.where(valid, marker % _DETECTION_SHIFT, marker)
        h, w = crop.shape[-2:]
        out = {"image": normalize(crop), "valid": valid}
        # Views are drawn in one fixed order (strong1, box1, strong2, box2), so each view is
        # the same whichever views a scheme asks for: an unneeded view before a needed one
        # still makes its random draws (a strong view on a 1x1 stand-in: the draws of the
        # colour jitter, grayscale and blur do not depend on the image).
        last = max(self.strong_views, self.boxes)
        for i in range(1, last + 1):
            if i <= self.strong_views:
                out[f"strong{i}"] = normalize(self.strong(crop))
            else:
                self.strong(_STAND_IN)
            if i <= self.boxes or i < last:
                box = cutmix_box(h, w, **self.cutmix)
                if i <= self.boxes:
                    out[f"box{i}"] = box
        if mask is not None:
            out["oracle_mask"] = torch.where(marker == _ORACLE_VOID, ignore, marker)
        if detections is not None:
            out["detections"] = detected
        return out
