"""Warm starts (`model.init_from`): which semiseg checkpoint starts which network, and loading
its evaluated weights into a model with errors that name the key and the file."""

from __future__ import annotations

from torch import Tensor, nn

from semiseg.checkpoint import CheckpointError, load_checkpoint
from semiseg.config import ConfigError


def warm_start_sources(init_from: str | list[str], model_names: tuple[str, ...]) -> dict[str, str]:
    """Which checkpoint starts which network: one path for all, or one per network in order."""
    if isinstance(init_from, str):
        return dict.fromkeys(model_names, init_from)
    if len(init_from) != len(model_names):
        raise ConfigError(
            f"model.init_from: {len(init_from)} checkpoints for a scheme with {len(model_names)} "
            f"network(s) {list(model_names)}; give one path, or one per network in that order"
        )
    return dict(zip(model_names, init_from, strict=True))


def load_warm_start(path: str, num_classes: int) -> dict[str, Tensor]:
    """The evaluated model's weights of the semiseg checkpoint at ``path`` (``model.init_from``).

    Raises:
        ConfigError: no such file, not a semiseg checkpoint, or one trained for a different
            number of classes.
    """
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    if ckpt.get("num_classes") != num_classes:
        raise ConfigError(
            f"model.init_from: {path} has {ckpt.get('num_classes')} classes, this dataset has {num_classes}"
        )
    return ckpt["eval_model"]


def load_weights(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Load `state` (from the checkpoint at `path`) into `model`; a mismatch is a ConfigError
    naming `model.init_from`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shape mismatches
        raise ConfigError(f"model.init_from: {path} does not fit this model: {err}") from None
    # A projection head (STPG's contrastive losses) is trained per run: one the checkpoint
    # lacks stays as initialised, one this model lacks is not needed.
    missing = [k for k in missing if not k.startswith("projector.")]
    unexpected = [k for k in unexpected if not k.startswith("projector.")]
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from: {path} does not fit this model (missing keys: {missing[:5]}, "
            f"unexpected keys: {unexpected[:5]}); check model.name and model.backbone"
        )
