"""Transforms: image and mask stay aligned, randomness is reproducible, arguments checked."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

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

# Distinct, saturated colours so that an image pixel identifies its class.
COLOURS = torch.tensor(
    [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200]],
    dtype=torch.uint8,
)


def block_scene(height: int, width: int, block: int, seed: int = 0):
    """Mask int64 [H, W] of constant blocks (random class per block), image = colour[mask]."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randint(
        0, len(COLOURS), (height // block + 1, width // block + 1), generator=generator
    )
    mask = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)[:height, :width]
    image = COLOURS[mask].permute(2, 0, 1).contiguous()
    return image, mask


def interior(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """bool [H, W]: pixels whose (2r+1)^2 neighbourhood holds a single label."""
    values = mask[None, None].float()
    high = nnf.max_pool2d(values, 2 * radius + 1, stride=1, padding=radius)
    low = -nnf.max_pool2d(-values, 2 * radius + 1, stride=1, padding=radius)
    return (high == low)[0, 0]


def assert_colours_match(out: dict, tolerance: int, radius: int) -> int:
    """Every labeled interior pixel shows its class colour; returns how many were checked."""
    image = denormalize(out["image"]).permute(1, 2, 0).int()
    mask = out["mask"]
    check = (mask != 255) & interior(mask, radius)
    expected = COLOURS[mask[check]].int()
    assert (image[check] - expected).abs().max() <= tolerance
    return int(check.sum())


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_exact_alignment_without_rescale(seed):
    image, mask = block_scene(40, 56, block=5, seed=seed)
    transform = TrainTransform((32, 48), scale_range=(1.0, 1.0))
    torch.manual_seed(seed)
    out = transform(image, mask)
    assert out["image"].shape == (3, 32, 48) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (32, 48) and out["mask"].dtype == torch.int64
    assert assert_colours_match(out, tolerance=1, radius=0) == 32 * 48


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_alignment_with_rescale_and_padding(seed):
    image, mask = block_scene(48, 64, block=12, seed=seed)
    # Crop larger than the image at small scales, so padding occurs too.
    transform = TrainTransform((56, 72), scale_range=(0.5, 2.0))
    torch.manual_seed(seed)
    out = transform(image, mask)
    assert assert_colours_match(out, tolerance=3, radius=2) > 100
    padded = out["mask"] == 255
    assert (denormalize(out["image"]).permute(1, 2, 0)[padded] == 0).all()


# Scales with exact binary ratios, so that no pixel centre falls on a rounding tie.
@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_mask_resize_samples_pixel_centres_like_pil(scale):
    generator = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 5, (40, 56), generator=generator)
    size = (round(40 * scale), round(56 * scale))
    transform = TrainTransform(size, scale_range=(scale, scale), hflip=False)
    out = transform(COLOURS[mask].permute(2, 0, 1).contiguous(), mask)
    reference = Image.fromarray(mask.numpy().astype(np.uint8)).resize(size[::-1], Image.NEAREST)
    assert np.array_equal(out["mask"].numpy(), np.array(reference))


def test_padding_is_ignore_and_black():
    image, mask = block_scene(8, 10, block=2)
    out = TrainTransform(16, scale_range=(1.0, 1.0), hflip=False)(image, mask)
    assert (out["mask"][:8, :10] == mask).all()
    assert (out["mask"][8:] == 255).all() and (out["mask"][:, 10:] == 255).all()
    assert int((out["mask"] == 255).sum()) == 16 * 16 - 8 * 10
    pixels = denormalize(out["image"])
    assert (pixels[:, 8:] == 0).all() and (pixels[:, :, 10:] == 0).all()


def test_flip_happens_for_some_seeds_only():
    image, mask = block_scene(12, 16, block=3)
    transform = TrainTransform((12, 16), scale_range=(1.0, 1.0))
    flipped = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image, mask)
        if (out["mask"] == mask).all():
            flipped.add(False)
        else:
            assert (out["mask"] == mask.flip(-1)).all()
            flipped.add(True)
    assert flipped == {False, True}


def test_train_transform_without_mask_and_geometric():
    image, _ = block_scene(20, 20, block=4)
    out = TrainTransform(16)(image, None)
    assert set(out) == {"image"} and out["image"].shape == (3, 16, 16)
    raw, mask = TrainTransform(16).geometric(image, None)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 16, 16) and mask is None


def test_geometric_of_zero_mask_marks_padding():
    image, _ = block_scene(10, 10, block=2)
    _, pad = TrainTransform(12, scale_range=(1.0, 1.0)).geometric(
        image, torch.zeros(10, 10, dtype=torch.int64)
    )
    assert int((pad == 255).sum()) == 12 * 12 - 10 * 10


def test_train_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(32, scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(0)
    with pytest.raises(ValueError, match="uint8"):
        TrainTransform(8)(torch.zeros(3, 8, 8), None)


def test_normalize_round_trip():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    normalized = normalize(image)
    assert normalized.dtype == torch.float32
    black = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).flatten()
    assert torch.allclose(black, -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))
    assert (denormalize(normalized) == image).all()
    with pytest.raises(ValueError):
        normalize(image.float())


def test_strong_transform_reproducible_and_photometric_only():
    image, _ = block_scene(24, 24, block=4)
    strong = StrongTransform()
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(strong(image))
    assert outputs[0].dtype == torch.uint8 and outputs[0].shape == image.shape
    assert torch.equal(outputs[0], outputs[1])
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        changed += not torch.equal(strong(image), image)
    assert changed >= 5
    identity = StrongTransform(jitter_p=0, grayscale_p=0, blur_p=0)
    assert torch.equal(identity(image), image)
    with pytest.raises(ValueError):
        StrongTransform(blur_p=1.5)


def test_strong_blur_on_tiny_image():
    torch.manual_seed(0)
    out = StrongTransform(jitter_p=0, grayscale_p=0, blur_p=1)(
        torch.full((3, 2, 3), 9, dtype=torch.uint8)
    )
    assert out.shape == (3, 2, 3)


def test_cutmix_box_reproducible_and_inside_bounds():
    boxes = [
        cutmix_box(40, 60, p=1.0, generator=torch.Generator().manual_seed(s)) for s in range(30)
    ]
    again = [
        cutmix_box(40, 60, p=1.0, generator=torch.Generator().manual_seed(s)) for s in range(30)
    ]
    assert all(torch.equal(a, b) for a, b in zip(boxes, again, strict=True))
    assert len({tuple(b.nonzero().min(0).values.tolist()) for b in boxes}) > 5
    for box in boxes:
        assert box.shape == (40, 60) and box.dtype == torch.bool
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        height, width = len(rows), len(cols)
        # A filled rectangle whose area respects size_max (floors only shrink it).
        assert int(box.sum()) == height * width
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        assert 0 < height * width <= 0.4 * 40 * 60


def test_cutmix_box_probability_and_global_rng():
    state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(0)
    filled = [bool(cutmix_box(32, 32, p=0.5, generator=generator).any()) for _ in range(200)]
    assert 60 < sum(filled) < 140
    assert torch.equal(torch.get_rng_state(), state)
    assert not cutmix_box(8, 8, p=0.0).any()
    assert cutmix_box(8, 300, p=1.0, generator=torch.Generator().manual_seed(1)).any()
    with pytest.raises(ValueError):
        cutmix_box(8, 8, size_min=0.5, size_max=0.1)


def test_stpg_cutmix_is_a_union_of_three_boxes_of_a_quarter_to_half_the_sides():
    for s in range(20):
        generator = torch.Generator().manual_seed(s)
        union = cutmix_box(40, 60, p=0.0, count=3, side=(0.25, 0.5), generator=generator)
        assert not union.any()  # p still applies
        generator = torch.Generator().manual_seed(s)
        union = cutmix_box(40, 60, p=1.0, count=3, side=(0.25, 0.5), generator=generator)
        # No single box reaches past half a side, so the union is at least one box of
        # 10x15 and at most three of 20x30.
        assert 10 * 15 <= int(union.sum()) <= 3 * 20 * 30
        one = cutmix_box(
            40, 60, p=1.0, side=(0.25, 0.5), generator=torch.Generator().manual_seed(s)
        )
        rows, cols = one.any(1).nonzero(), one.any(0).nonzero()
        assert (
            10 <= len(rows) <= 20
            and 15 <= len(cols) <= 30
            and int(one.sum()) == len(rows) * len(cols)
        )
    # The default draw is UniMatch's, unchanged by the new options' defaults.
    assert torch.equal(
        cutmix_box(40, 60, p=1.0, generator=torch.Generator().manual_seed(3)),
        cutmix_box(40, 60, p=1.0, count=1, side=None, generator=torch.Generator().manual_seed(3)),
    )
    with pytest.raises(ValueError, match="count"):
        cutmix_box(8, 8, count=0)
    with pytest.raises(ValueError, match="side"):
        cutmix_box(8, 8, side=(0.6, 0.5))


def test_eval_transform_modes():
    image, mask = block_scene(30, 40, block=5)
    out = EvalTransform()(image, mask)
    assert out["image"].shape == (3, 30, 40) and torch.equal(out["mask"], mask)
    resized = EvalTransform("resize", 15)(image, mask)
    assert resized["image"].shape == (3, 15, 20)
    assert torch.equal(resized["mask"], mask)  # metrics at the original label resolution
    assert EvalTransform("resize", (12, 12))(image, None)["image"].shape == (3, 12, 12)
    assert set(EvalTransform("sliding", 16)(image, None)) == {"image"}
    with pytest.raises(ValueError, match="mode"):
        EvalTransform("crop")
    with pytest.raises(ValueError, match="size"):
        EvalTransform("resize")


def test_unlabeled_views_share_the_weak_crop_and_mark_padding():
    from semiseg.data.transforms import UnlabeledTransform

    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    weak = TrainTransform(32, scale_range=(1.0, 1.0), hflip=False)
    views = UnlabeledTransform(weak, cutmix_p=1.0)(image)
    assert set(views) == {"image", "strong1", "strong2", "box1", "box2", "valid"}
    assert views["image"].shape == views["strong1"].shape == (3, 32, 32)
    # The 20x30 image padded right and bottom to 32x32: exactly its own pixels are valid.
    assert int(views["valid"].sum()) == 20 * 30
    assert bool(views["valid"][:20, :30].all())
    assert bool(views["box1"].any()) and bool(views["box2"].any())
    mask = torch.randint(0, 5, (20, 30))
    mask[0, :5] = 255
    views = UnlabeledTransform(weak)(image, mask)
    assert torch.equal(views["oracle_mask"][:20, :30], mask)
    assert bool((views["oracle_mask"][20:] == 255).all())
    # Void pixels of the oracle mask must not leak into `valid` (only padding does).
    assert int(views["valid"].sum()) == 20 * 30
