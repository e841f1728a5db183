"""Typed run configuration: dataclasses loaded from YAML with dotted overrides.

A config file is a nested mapping whose sections mirror the dataclasses below. Every
key is checked: an unknown key or a value of the wrong type is a `ConfigError` that
names the dotted key, never a silent default. Overrides given on the command line
(`optim.lr=0.01`) are parsed as YAML scalars and win over the file.

The `scheme`, `policy` and `loss` sections are component sections: their `name` picks a
registered component (`semiseg.registry`) and the other keys are checked against that
component's own options dataclass, so an option of another component is an error that
says whose it is. A layer (a child preset over its `base:`, or an override) that changes a
component section's `name` starts that section afresh: the keys the lower layers gave the
previous component are dropped. Schemes that learn from no online pseudo labels take no
`policy` and `loss` sections; for the others an absent section means the default component
(policy `threshold`, loss `ce`). After the sections are built, each chosen component
checks the whole config (`check_config`) and refuses combinations it cannot run.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from semiseg import config_legacy
from semiseg.files import atomic_write_text
from semiseg.options import ComponentOptions, ConfigError, OptionError, Options, did_you_mean

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "config_from_saved",
    "load_config",
    "save_config",
]


@dataclass
class DataConfig:
    """Where the data lives and how it is sampled and augmented."""

    format: Literal["folder", "voc", "cityscapes", "camvid"] = "folder"
    root: str = ""
    labeled: str = ""
    """Split list of labeled samples (UniMatch style, paths relative to `root`)."""
    unlabeled: str | None = None
    """Split list of unlabeled images; a second path on a line (a mask) is never used for training."""
    pseudo_labeled: str | None = None
    """Split list of unlabeled images with pseudo-label masks (`semiseg pseudo-label` writes
    OUT/list.txt), for one self-training round; unset, `self_training` runs every round."""
    val: str | None = None
    """Split list of validation samples; None evaluates the format's standard 'val' subset."""
    num_classes: int | None = None
    """Needed for the `folder` format unless `root/classes.txt` exists; fixed by the other formats."""
    class_names: list[str] | None = None
    crop_size: int = 321
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    rotate: float = 0.0
    """Training crops are rotated by an angle uniform in [-rotate, rotate] degrees, with
    probability 0.5 (DARS' recipe: 10); 0 never rotates."""
    blur: bool = False
    """Training crops get a 5 x 5 Gaussian blur with probability 0.5 (DARS' recipe)."""
    batch_size: int = 8
    """Labeled images per step and per process (the global batch is this times the world size)."""
    unlabeled_batch_size: int | None = None
    """Unlabeled images per step and per process; None means equal to batch_size."""
    workers: int = 2
    augment_on: Literal["loader", "device"] = "loader"
    """Where training samples are augmented: 'loader' (the loader workers, on the CPU) or
    'device' (the training process, on the model's device: the workers only decode, and each
    sample is transformed there with the same ops and random draws, so on the CPU the batches
    are identical). 'device' for many concurrent runs on one GPU, whose CPU cores cannot keep
    up with their loaders (a UniMatch sample's strong views cost about 50 ms of CPU)."""
    cache: bool = False
    """Keep every decoded image and mask in memory after its first read, so later epochs
    augment from memory (each loader worker holds a copy: RAM grows by the decoded set per
    worker). For many concurrent runs on one fast device, where decoding bounds the step."""
    eval_mode: Literal["none", "resize", "sliding"] = "none"
    eval_size: int | None = None
    """Shorter side for `resize` evaluation, window size for `sliding` (default: crop_size)."""
    eval_batch_size: int = 1
    """Validation images per forward pass; above 1 only when all validation images share one size."""
    check: Literal["deep", "shallow"] = "deep"
    """Up-front validation of every listed file: `deep` decodes every image and mask (labeled,
    unlabeled, val), `shallow` only reads their headers."""


@dataclass
class ModelConfig:
    name: Literal["deeplabv3plus", "pspnet"] = "deeplabv3plus"
    backbone: Literal["resnet50", "resnet101", "efficientnet_lite0", "tiny"] = "resnet101"
    pretrained: str | None = "imagenet"
    """'imagenet', a torchvision weight name (needs internet), a local file path, or null."""
    output_stride: Literal[8, 16] = 16
    decoder: Literal["standard", "light"] = "standard"
    """DeepLabV3+ decoder: 'standard' (3x3 convolutions, as the papers) or 'light'
    (depthwise-separable 3x3 convolutions in ASPP and the decoder, as the DeepLabV3+ paper's
    Xception model; about a tenth of the decoder's FLOPs)."""
    decoder_channels: int = 256
    """Channels of ASPP and the DeepLabV3+ decoder (the papers: 256); the pixel features
    policies and projection heads read have this many."""
    init_from: str | list[str] | None = None
    """A semiseg checkpoint whose evaluated model's weights start every network of the scheme
    (a warm start from a supervised run, or a self-training round from its teacher), or one
    checkpoint per student in the scheme's order (CPS: student, student_b; STPG: student (general), student_pro), so
    that two-student schemes keep differently initialised students. Ignored when resuming."""


@dataclass
class OptimConfig:
    lr: float = 0.001
    """Backbone learning rate for the global batch this config was written for (see README)."""
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    poly_start: float = 0.0
    """Progress of the poly schedule at iteration 0, in [0, 1): 0 starts it afresh; a
    self-training round that continues its teacher's schedule starts at k/(k+1)."""
    nesterov: bool = False


@dataclass
class TrainConfig:
    iterations: int | None = None
    """Optimiser steps (and length of the poly schedule); unset: 1000, or resolved from
    `epochs` when the run starts (`semiseg.schedule`; saved in the run's config.yaml)."""
    epochs: float | None = None
    """The schedule in passes over a split list instead of `iterations` (the papers'
    recipes): over the unlabeled list for semi-supervised schemes and self-training rounds,
    over the labeled list for supervised training (`epoch_list` chooses)."""
    epoch_list: Literal["auto", "labeled", "unlabeled"] = "auto"
    eval_every: int = 200
    checkpoint_every: int | None = None
    """Iterations between `latest.pt` writes; None means eval_every."""
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each process takes its LOCAL_RANK GPU."""
    cuda_sync: Literal["auto", "block"] = "auto"
    """How the process waits for its GPU: 'auto' is CUDA's default (it spins, holding a core,
    when the machine has more cores than the process has GPUs); 'block' sleeps, leaving the
    core to others: for many runs sharing one GPU and few cores (`benchmarks/gpu_grid.py`)."""
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    """Mixed precision: 'auto' is bf16 on GPUs that have it (else fp16) and on CPUs with
    AMX bf16 tiles, fp32 elsewhere (`semiseg.precision`); 'off' is fp32."""
    channels_last: bool = True
    """Convolutional networks and their inputs in channels-last memory layout (faster
    convolutions on CPUs and on GPUs with tensor cores; same results up to rounding)."""
    compile: bool = False
    """torch.compile the trained networks: minutes of compilation on the first steps. Off by
    default: on a 2-core AVX2 CPU the compiled steps were 1.75x slower than eager ones
    (benchmarks/results/step_speed.md, run 4); time it with benchmarks/step_speed.py
    --compile before turning it on."""
    deterministic: bool = False
    threads: int | None = None
    """torch intra-op threads per process; None leaves torch's default."""


@dataclass
class EvalConfig:
    tail_classes: list[int] = field(default_factory=list)
    """Class indices whose mean IoU is reported as tail mIoU (long-tailed datasets)."""


COMPONENT = "component"
"""Field metadata key of the component sections: the registry's kind."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheme: ComponentOptions = field(default=None, metadata={COMPONENT: "scheme"})  # type: ignore[assignment]
    """The scheme's options (`semiseg.schemes`); None in the constructor means the default scheme."""
    policy: ComponentOptions | None = field(default=None, metadata={COMPONENT: "policy"})
    """The pseudo-label policy's options (`semiseg.pseudo`); None for schemes without one."""
    loss: ComponentOptions | None = field(default=None, metadata={COMPONENT: "loss"})
    """The unlabeled loss's options (`semiseg.pseudo`); None for schemes without one."""
    labeled_loss: ComponentOptions = field(default=None, metadata={COMPONENT: "labeled_loss"})  # type: ignore[assignment]
    """The labeled images' loss (`semiseg.losses`: ce, ohem)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"

    def __post_init__(self) -> None:
        found = registries()
        for section in ("scheme", "labeled_loss"):
            if getattr(self, section) is None:
                setattr(self, section, found[section].options(found[section].default)())

    def validate(self) -> None:
        """Checks of the general sections that a single type annotation cannot express."""
        if self.train.epochs is not None:
            if self.train.iterations is not None:
                raise ConfigError("give train.iterations or train.epochs, not both")
            if self.train.epochs <= 0:
                raise ConfigError(f"train.epochs must be positive, got {self.train.epochs}")
        elif self.train.iterations is None:
            self.train.iterations = 1000
        positive = {
            "data.crop_size": self.data.crop_size,
            "data.batch_size": self.data.batch_size,
            "data.eval_batch_size": self.data.eval_batch_size,
            "train.eval_every": self.train.eval_every,
            "train.log_every": self.train.log_every,
        }
        if self.data.unlabeled_batch_size is not None:
            positive["data.unlabeled_batch_size"] = self.data.unlabeled_batch_size
        if self.train.checkpoint_every is not None:
            positive["train.checkpoint_every"] = self.train.checkpoint_every
        if self.train.iterations is not None:
            positive["train.iterations"] = self.train.iterations
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        low, high = self.data.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"data.scale_range must satisfy 0 < min <= max, got {[low, high]}")
        if self.data.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.data.workers}")
        if not self.data.root:
            raise ConfigError("data.root is required (the dataset folder)")
        if not self.data.labeled:
            raise ConfigError("data.labeled is required (a split list of labeled samples)")
        if self.data.num_classes is not None and self.data.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {self.data.num_classes}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if not 0 <= self.optim.poly_start < 1:
            raise ConfigError(f"optim.poly_start must be in [0, 1), got {self.optim.poly_start}")
        if self.train.amp == "fp16" and not self.train.device.startswith(("cuda", "auto")):
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")
        if self.model.name != "deeplabv3plus" and (
            self.model.decoder != "standard" or self.model.decoder_channels != 256
        ):
            raise ConfigError(
                f"model.decoder and model.decoder_channels shape the DeepLabV3+ decoder; model.name is {self.model.name!r}"
            )
        if self.model.decoder_channels < 8:
            raise ConfigError(
                f"model.decoder_channels must be at least 8, got {self.model.decoder_channels}"
            )


def registries() -> dict:
    """The component registries of the config's component sections, by kind."""
    from semiseg.losses import LABELED_LOSSES
    from semiseg.pseudo import LOSSES, POLICIES
    from semiseg.schemes import SCHEMES

    return {"scheme": SCHEMES, "policy": POLICIES, "loss": LOSSES, "labeled_loss": LABELED_LOSSES}


def component_sections() -> dict[str, str]:
    """Config field name -> registry kind, for the component sections."""
    return {
        f.name: f.metadata[COMPONENT] for f in dataclasses.fields(Config) if COMPONENT in f.metadata
    }


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            # An optional field: the error of its one type says more than the union's name.
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        # YAML 1.1 reads `off` and `on` as booleans: `train.amp=off` means the word.
        if isinstance(value, bool) and ("on" if value else "off") in args:
            value = "on" if value else "off"
        if value not in args:
            typo = did_you_mean(value, [a for a in args if isinstance(a, str)])
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}{typo}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {
            _coerce(k, key_type, f"{key} key"): _coerce(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and type (errors name `prefix.key`)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            hint = config_legacy.moved_section(dotted) if not prefix else None
            raise ConfigError(
                hint
                or f"unknown key '{dotted}'{did_you_mean(key, names)} (known keys here: {known})"
            )
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """Turn `["optim.lr=0.01", "data.scale_range=[0.5,1.5]"]` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, update: dict, top: bool = True) -> dict:
    """`update` over `base`, recursively; at the top level a component section whose `name`
    `update` changes is replaced instead of merged (see the module docstring)."""
    out = dict(base)
    components = component_sections() if top else {}
    for key, value in update.items():
        old = out.get(key)
        renamed = (
            key in components
            and isinstance(value, dict)
            and isinstance(old, dict)
            and "name" in value
            and value["name"] != old.get("name")
        )
        if isinstance(value, dict) and isinstance(old, dict) and not renamed:
            out[key] = _merge(old, value, top=False)
        else:
            out[key] = value
    return out


def _component(kind: str, raw: Any, registry: Any) -> ComponentOptions:
    """The options of the component a section names, every key checked against them."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind}: expected a mapping (section), got {raw!r}")
    name = raw.get("name", registry.default)
    if not isinstance(name, str):
        raise ConfigError(f"{kind}.name: expected a {kind} name, got {name!r}")
    try:
        options_cls = registry.options(name)
    except ConfigError as err:
        raise ConfigError(f"{kind}.name: {err}") from None
    known = {f.name for f in dataclasses.fields(options_cls)}
    for key in raw:
        if key not in known:
            owners = [other for other in registry.owners(key) if other != name]
            whose = (
                f"; it is an option of {kind} {', '.join(repr(o) for o in owners)}"
                if owners
                else ""
            )
            takes = ", ".join(sorted(known - {"name"})) or "no options"
            typo = did_you_mean(key, known - {"name"})
            raise ConfigError(
                f"{kind}.{key} is not an option of {kind} {name!r}{whose}{typo} "
                f"({name!r} takes: {takes})"
            )
    return build_dataclass(options_cls, raw, kind)


def _validate_options(options: Options, prefix: str) -> None:
    """`validate` of an options dataclass and of the options nested in it, errors prefixed."""
    try:
        options.validate()
    except OptionError as err:
        raise ConfigError(f"{prefix}.{err.key} {err.message}") from None
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, Options):
            _validate_options(value, f"{prefix}.{f.name}")


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a `Config` from a nested mapping plus dotted overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    merged = _merge(data, parse_overrides(overrides or []))
    kinds = component_sections()
    plain = {k: v for k, v in merged.items() if k not in kinds}
    cfg = build_dataclass(Config, plain)
    found = registries()
    cfg.scheme = _component("scheme", merged.get("scheme"), found["scheme"])
    teaches = found["scheme"].get(cfg.scheme.name).teaches
    cfg.labeled_loss = _component("labeled_loss", merged.get("labeled_loss"), found["labeled_loss"])
    for section in ("policy", "loss"):
        raw = merged.get(section)
        # A scheme without online pseudo labels keeps an explicit section, for its own
        # check_config to refuse with the reason; absent, it gets none.
        setattr(
            cfg,
            section,
            _component(section, raw, found[section]) if teaches or raw is not None else None,
        )
    cfg.validate()
    for section in kinds:
        options = getattr(cfg, section)
        if options is not None:
            _validate_options(options, section)
    for section, kind in kinds.items():
        options = getattr(cfg, section)
        if options is not None:
            found[kind].get(options.name).check_config(cfg)
    return cfg


def config_from_saved(data: dict) -> Config:
    """The `Config` of a saved config (a checkpoint's, a run folder's config.yaml), written by
    this or an earlier semiseg (`semiseg.config_legacy` upgrades the old layout)."""
    return config_from_dict(config_legacy.upgrade(data))


def read_config_tree(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The nested mapping of a YAML config, with its `base:` file (if any) merged underneath.

    `base: other.yaml` (relative to this file's folder) lets a preset state only what it
    changes, e.g. a method preset on top of the dataset's supervised preset.
    """
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" + (f" (base of {_chain[-1]})" if _chain else "")
        )
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    return _merge(read_config_tree(path.parent / base, (*_chain, path.resolve())), data)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (and its `base:` chain); relative paths inside stay relative to the working directory."""
    path = Path(path)
    data = read_config_tree(path)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{_culprit(data, overrides, err, path)}: {err}") from None


def _culprit(data: dict, overrides: list[str] | None, err: ConfigError, path: Path) -> str:
    """Who an error of `data` + `overrides` is due to: the file when it fails alone with the
    same message, else the command-line overrides."""
    if not overrides:
        return str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config_from_dict(data)
        except ConfigError as alone:
            if str(alone) == str(err):
                return str(path)
    return f"the overrides {' '.join(overrides)}"


def load_saved_config(path: str | os.PathLike) -> Config:
    """The config a run folder saved (`RUN/config.yaml`), of this or an earlier semiseg."""
    path = Path(path)
    try:
        return config_from_saved(read_config_tree(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
