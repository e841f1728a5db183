"""`semiseg export`: a checkpoint's evaluated network as a deployable model.

The exported model takes what an application has at hand and does the rest itself:

- input `image`: float32 [N, 3, H, W], RGB, pixel values / 255 (in [0, 1]), at exactly the
  H x W it was exported for (EfficientNet's same-padding is fixed at export); N is free;
- inside: ImageNet normalisation, (x - mean) / std with mean (0.485, 0.456, 0.406) and
  std (0.229, 0.224, 0.225), as in training;
- output `logits`: float32 [N, C, H, W]; the class map is their argmax over C.

Resize an image to H x W before and the class map back after, as `semiseg eval` does in
`resize` mode. Formats: `onnx` (torch.onnx's exporter, opset 18; onnxruntime runs it),
`torch-export` (a `torch.export` program, `torch.export.load`), `torchscript` (traced). A
JSON file beside the model (`OUT.json`) records the input size, the classes, their palette
and the checkpoint it came from.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from semiseg.data.formats import get_format
from semiseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from semiseg.files import atomic_write, atomic_write_text
from semiseg.inference import load_trained_model
from semiseg.options import ConfigError

FORMATS = ("onnx", "torch-export", "torchscript")


class DeployedSegmenter(nn.Module):
    """A segmentation network behind ImageNet normalisation: RGB in [0, 1] -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        return self.model((image - self.mean) / self.std).logits


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, fmt: str = "onnx", size: tuple[int, int] | None = None
) -> Path:
    """Export `checkpoint`'s evaluated network to `out` for images of `size` (H, W; default
    the checkpoint's evaluation or crop size, square); returns the JSON description's path."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, cfg, ckpt = load_trained_model(checkpoint, torch.device("cpu"))
    side = cfg.data.eval_size or cfg.data.crop_size
    height, width = size or (side, side)
    if height < 32 or width < 32:
        raise ConfigError(f"--size must be at least 32 x 32, got {height} x {width}")
    deployed = DeployedSegmenter(model).eval()
    # Two images: torch.export specialises a dimension of size 1, and the batch is free.
    example = torch.rand(2, 3, height, width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            _onnx(deployed, example, out)
        elif fmt == "torch-export":
            program = torch.export.export(deployed, (example,), dynamic_shapes=_batch_dynamic())
            atomic_write(out, lambda tmp: torch.export.save(program, tmp))
        else:
            with warnings.catch_warnings():
                # TorchScript is deprecated (torch.export replaces it); the trace is still exact.
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(deployed, example)
                atomic_write(out, lambda tmp: torch.jit.save(traced, tmp))
    names = list(ckpt["class_names"])
    palette = get_format(cfg.data.format, ckpt["num_classes"], names).palette
    description = {
        "format": fmt,
        "model": out.name,
        "input": {
            "name": "image",
            "shape": ["N", 3, height, width],
            "dtype": "float32",
            "channels": "RGB",
            "values": "pixel / 255, in [0, 1]",
            "normalisation": {
                "inside the model": "(x - mean) / std",
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
        },
        "output": {
            "name": "logits",
            "shape": ["N", len(names), height, width],
            "class map": "argmax over dim 1",
        },
        "classes": names,
        "palette": [list(colour) for colour in palette[: len(names)]],
        "checkpoint": str(checkpoint),
        "iteration": ckpt.get("iteration"),
        "network": f"{cfg.model.name}/{cfg.model.backbone}",
    }
    path = out.with_name(out.name + ".json")
    atomic_write_text(path, json.dumps(description, indent=2) + "\n")
    return path


def _batch_dynamic() -> dict:
    return {"image": {0: torch.export.Dim("batch", max=4096)}}


def _onnx(deployed: nn.Module, example: Tensor, out: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; a clear error beats its own)
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'semiseg[export]'"
        ) from None

    def write(tmp: str) -> None:
        torch.onnx.export(
            deployed,
            (example,),
            tmp,
            input_names=["image"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes=_batch_dynamic(),
            opset_version=18,
            verbose=False,
        )

    atomic_write(out, write)
