"""Typed run configuration: dataclasses loaded from YAML with dotted overrides.

A config file is a nested mapping whose sections mirror the dataclasses below. Every
key is checked: an unknown key or a value of the wrong type is a `ConfigError` that
names the dotted key, never a silent default. Overrides given on the command line
(`optim.lr=0.01`) are parsed as YAML scalars and win over the file.
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

from semiseg.files import atomic_write_text


class ConfigError(ValueError):
    """A configuration problem; the message names the offending dotted key."""


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
    batch_size: int = 8
    """Labeled images per step and per process (the global batch is this times the world size)."""
    unlabeled_batch_size: int | None = None
    """Unlabeled images per step and per process; None means equal to batch_size."""
    workers: int = 2
    eval_mode: Literal["none", "resize", "sliding"] = "none"
    eval_size: int | None = None
    """Shorter side for `resize` evaluation, window size for `sliding` (default: crop_size)."""
    eval_batch_size: int = 1
    """Validation images per forward pass; above 1 only when all validation images share one size."""
    check: Literal["deep", "shallow"] = "deep"
    """Up-front validation of labeled and val files: `deep` decodes every mask, `shallow` only opens headers."""


@dataclass
class ModelConfig:
    name: Literal["deeplabv3plus", "pspnet"] = "deeplabv3plus"
    backbone: Literal["resnet50", "resnet101", "efficientnet_lite0", "tiny"] = "resnet101"
    pretrained: str | None = "imagenet"
    """'imagenet', a torchvision weight name (needs internet), a local file path, or null."""
    output_stride: Literal[8, 16] = 16
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
    nesterov: bool = False


@dataclass
class SchemeConfig:
    name: Literal[
        "supervised", "fixmatch", "unimatch", "mean_teacher", "cps", "self_training", "stpg"
    ] = "supervised"
    ema_decay: float = 0.0
    """Decay of an EMA copy of the student kept for evaluation (UniMatch/DAW use 0.999); 0 keeps none."""
    eval_ema: bool = False
    """Evaluate (and pick the best checkpoint by) the EMA copy instead of the raw student."""
    aux_weight: float = 0.4
    """Weight of a model's auxiliary head loss (PSPNet); ignored for models without one."""
    unsup_weight: float = 1.0
    """Weight of the unlabeled loss (mean teacher, CPS); FixMatch and UniMatch use their papers' fixed weights."""
    teacher_decay: float = 0.99
    """EMA decay of the mean teacher."""
    cutmix_p: float = 0.5
    """Probability that a strong view gets a CutMix box from the mix-source batch."""
    cutmix_boxes: int = 1
    """CutMix boxes per strong view (their union is pasted); STPG uses 3."""
    cutmix_side: list[float] | None = None
    """[lo, hi]: each box's height and width are fractions uniform in [lo, hi] of the crop's
    (STPG: [0.25, 0.5]); None: UniMatch's box, area 0.02-0.4 of the crop."""
    oracle_eval: bool = False
    """Research diagnostics: read the unlabeled images' masks (if every line has one) to log
    pseudo-label accuracy of used and discarded pixels. They never enter a loss."""


@dataclass
class PolicyConfig:
    """Which unlabeled pixels teach the student, with what weight (semiseg.pseudo)."""

    name: Literal["pseudo_label", "threshold", "ael", "daw", "rankweight"] = "threshold"
    threshold: float = 0.95
    """Confidence threshold of the `threshold` policy (FixMatch/UniMatch: 0.95)."""
    power: float = 2.0
    """Exponent of the `ael` power weight conf ** power."""
    momentum: float = 0.99
    """EMA momentum of DAW's statistics (Eq. 6)."""
    align: bool = True
    """DAW distribution alignment (Eq. 12-13)."""
    weighting: bool = True
    """DAW's optimal step threshold t* (Eq. 11); off leaves alignment alone (Table 4)."""
    variant: Literal["paper", "official"] = "paper"
    """Follow the paper's equations or reproduce the released code (see METHODS)."""
    k: int = 5
    """rankweight: size of the top-k index sets compared (the paper's 5)."""
    bank_size: int = 256
    """rankweight: features kept per class in each memory bank (psi)."""
    per_update: int | None = 8
    """rankweight: at most this many random features per class enter a bank per step (the
    released code adds at most a batch's worth, 8 on VOC, so a bank of 256 spans 32 steps);
    None: up to bank_size, so a frequent class's bank is refilled from every batch."""
    similarity: Literal["rank", "cosine"] = "rank"
    """rankweight: rank statistics (the method) or cosine similarity (its Fig. 6 comparison)."""
    rppi: bool = True
    """rankweight: prototypes also from detector-verified reliable unlabeled pixels (RPPI); off = PPW alone."""
    reliable_threshold: float = 0.95
    """rankweight: teacher confidence a detector-verified pixel needs to be reliable."""
    base: Literal["threshold", "ael"] = "threshold"
    """rankweight: the weight it multiplies, 1[conf >= threshold] or AEL's power weight."""
    warmup: int = 0
    """Labeled batches whose predictions (network in eval mode, nothing trained) feed a
    stateful policy's statistics before the first step of a fresh run. For short fine-tuning
    from a trained model, where DAW's EMA (m = 0.99) would otherwise be dominated by its
    initial fit for hundreds of steps; 0 is the papers' behaviour."""


@dataclass
class LossConfig:
    """How the student learns from the pseudo labels of unlabeled pixels (semiseg.losses)."""

    name: Literal["ce", "fpl"] = "ce"
    """'ce': cross-entropy with the policy's target; 'fpl': FPL's fuzzy positive loss (Eq. 7)
    on the top-K set of the teacher (Alg. 1), times the policy's weight."""
    T: float = 0.9
    """FPL's cumulative probability bound (paper: 0.85, 0.9 or 0.95)."""
    adaptive_weight: Literal["concave", "linear", "convex", "none"] = "concave"
    """FPL's per-pixel weight: Eq. 11 (concave), Eq. 16 (linear, convex), or none."""
    A: float = 50.0
    """Steepness of the concave adaptive weight (Eq. 11)."""
    variant: Literal["paper", "official"] = "paper"
    """FPL as in the paper or as in its released code (K <= 3, >= T, top-(K+1) mean; see METHODS)."""
    rescale: bool = False
    """Scale the FPL loss by the detached ratio CE / FPL so its value equals the cross-entropy
    loss, as the released CPS code does (the gradient direction stays FPL's)."""


@dataclass
class SelfTrainConfig:
    """Offline self-training in rounds (scheme `self_training`; DARS, Sec. 3)."""

    method: Literal["st", "cbst", "da", "dars"] = "dars"
    """Pseudo-label generator (semiseg.pseudo.dars); DA+TS is `da` with `temperature` 1.27."""
    alpha: list[float] = field(default_factory=lambda: [0.2])
    """Labeling ratio of each round after round 0; its length is the number of such rounds."""
    beta_min: list[float] = field(default_factory=lambda: [0.0])
    """Per round, the random-scale range's lower bound becomes (1 - beta_min) * min (Sec. 3.3)."""
    beta_max: list[float] = field(default_factory=lambda: [0.0])
    """Per round, the upper bound becomes (1 + beta_max) * max."""
    threshold: float | None = None
    """ST with one confidence threshold instead of a labeling ratio."""
    temperature: float = 1.0
    """Teacher logits are divided by it before the softmax (temperature scaling, TS)."""
    flip: bool = True
    """Average the teacher's logits over a horizontal flip (the released DARS code does)."""
    variant: Literal["paper", "official"] = "paper"
    """'official': the released code's CBST (+1 pixel), per-image DARS sampling, float16 softmax."""


@dataclass
class STPGConfig:
    """STPG's dual mean teacher with pixel selection and dual contrastive learning (scheme `stpg`)."""

    selection: Literal["cons", "cons+lmis", "cons+hmis", "all"] = "cons+hmis"
    """Gen-Teacher pixels that teach Pro-Student (Table 5): the method is cons+hmis; all = no selection (DM)."""
    lambda_u: float = 1.0
    """Weight of the two unlabeled losses (Eq. 17)."""
    lambda_ctr: float = 0.1
    """Weight of the anchor contrastive and similarity losses (Eq. 17); 0 turns DCL off."""
    tau: float = 0.5
    """Temperature of the anchor losses (Eq. 12, 15)."""
    alpha: float = 0.99
    """EMA momentum of the class prototypes (Eq. 13)."""
    phi: float = 0.95
    """Gen-Teacher confidence a labeled pixel needs to enter the memory bank."""
    bank_size: int = 256
    """Features per class in the memory bank (N)."""
    bank_topk: int = 32
    """Proximity-guided sampling: per class and step, the K confident features closest to their anchor enter the bank."""
    match_after: int = 100
    """Steps of prototype EMA before anchors are matched (Hungarian) and the contrastive losses start."""
    anchor_steps: int = 2000
    """Adam steps that spread the anchors (Eq. 12) once, before training."""
    contrast_pixels: int = 2048
    """Labeled pixels per student and step in the contrastive losses (a random subset, for memory)."""


@dataclass
class DetectorConfig:
    """The object detector of reliable pseudo-label pixels (`semiseg detector`, RPPI)."""

    classes: list[int] = field(default_factory=list)
    """Segmentation classes the detector learns ("thing" classes; stuff classes get no boxes)."""
    backbone: Literal["resnet50_fpn", "mobilenet_v3_fpn"] = "resnet50_fpn"
    """torchvision Faster R-CNN backbone, trained from scratch (the paper: ResNet-50 FPN)."""
    dir: str = "runs/detector"
    """Folder of the detector's checkpoint and cached detections."""
    iterations: int = 2000
    batch_size: int = 4
    lr: float = 5e-5
    """Adam learning rate (the released code)."""
    min_size: int = 800
    max_size: int = 1333
    """torchvision's resizing of detector inputs (shorter side, longer side cap)."""
    score_threshold: float = 0.85
    """Detections kept on unlabeled images (the paper: 0.85 VOC, 0.95 Cityscapes)."""
    min_component_pixels: int = 0
    """Components with fewer pixels of their class get no training box (the released code: 91)."""
    checkpoint_every: int = 200


@dataclass
class TrainConfig:
    iterations: int = 1000
    eval_every: int = 200
    checkpoint_every: int | None = None
    """Iterations between `latest.pt` writes; None means eval_every."""
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each process takes its LOCAL_RANK GPU."""
    amp: Literal["off", "fp16", "bf16"] = "off"
    deterministic: bool = False
    threads: int | None = None
    """torch intra-op threads per process; None leaves torch's default."""


@dataclass
class EvalConfig:
    tail_classes: list[int] = field(default_factory=list)
    """Class indices whose mean IoU is reported as tail mIoU (long-tailed datasets)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheme: SchemeConfig = field(default_factory=SchemeConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    stpg: STPGConfig = field(default_factory=STPGConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"

    def validate(self) -> None:
        """Cross-field checks that a single type annotation cannot express."""
        positive = {
            "data.crop_size": self.data.crop_size,
            "data.batch_size": self.data.batch_size,
            "data.eval_batch_size": self.data.eval_batch_size,
            "train.iterations": self.train.iterations,
            "train.eval_every": self.train.eval_every,
            "train.log_every": self.train.log_every,
        }
        if self.data.unlabeled_batch_size is not None:
            positive["data.unlabeled_batch_size"] = self.data.unlabeled_batch_size
        if self.train.checkpoint_every is not None:
            positive["train.checkpoint_every"] = self.train.checkpoint_every
        positive["loss.A"] = self.loss.A
        if self.policy.warmup < 0:
            raise ConfigError(f"policy.warmup must be >= 0, got {self.policy.warmup}")
        positive["selftrain.temperature"] = self.selftrain.temperature
        for key in ("iterations", "batch_size", "lr", "min_size", "max_size", "checkpoint_every"):
            positive[f"detector.{key}"] = getattr(self.detector, key)
        for key in ("tau", "bank_size", "bank_topk", "anchor_steps", "contrast_pixels"):
            positive[f"stpg.{key}"] = getattr(self.stpg, key)
        if self.stpg.lambda_u < 0 or self.stpg.lambda_ctr < 0:
            raise ConfigError("stpg.lambda_u and stpg.lambda_ctr must be >= 0")
        if not 0 <= self.stpg.alpha < 1 or not 0 <= self.stpg.phi <= 1:
            raise ConfigError(
                f"stpg.alpha must be in [0, 1) and stpg.phi in [0, 1], got {self.stpg.alpha}, {self.stpg.phi}"
            )
        if not 0 <= self.detector.score_threshold <= 1:
            raise ConfigError(
                f"detector.score_threshold must be in [0, 1], got {self.detector.score_threshold}"
            )
        rounds = self.selftrain
        if not (len(rounds.alpha) == len(rounds.beta_min) == len(rounds.beta_max)):
            raise ConfigError(
                "selftrain.alpha, selftrain.beta_min and selftrain.beta_max need one value per round, got "
                f"{len(rounds.alpha)}, {len(rounds.beta_min)} and {len(rounds.beta_max)}"
            )
        for key in ("alpha", "beta_min", "beta_max"):
            bad = [v for v in getattr(rounds, key) if not 0.0 <= v <= 1.0]
            if bad:
                raise ConfigError(f"selftrain.{key} values must be in [0, 1], got {bad}")
        if rounds.method == "st" and rounds.threshold is not None and not 0 < rounds.threshold <= 1:
            raise ConfigError(f"selftrain.threshold must be in (0, 1], got {rounds.threshold}")
        if not 0.0 <= self.loss.T <= 1.0:
            raise ConfigError(f"loss.T must be in [0, 1], got {self.loss.T}")
        if (
            self.loss.name == "fpl"
            and self.policy.name == "threshold"
            and self.policy.threshold >= self.loss.T
        ):
            warnings.warn(
                f"policy.threshold {self.policy.threshold} >= loss.T {self.loss.T}: every pixel the threshold "
                "keeps has K = 1, so FPL reduces to (adaptively weighted) cross-entropy; use policy.name="
                "pseudo_label or a lower threshold",
                stacklevel=2,
            )
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
        if not 0 <= self.scheme.ema_decay < 1:
            raise ConfigError(f"scheme.ema_decay must be in [0, 1), got {self.scheme.ema_decay}")
        if self.scheme.eval_ema and self.scheme.ema_decay == 0:
            raise ConfigError("scheme.eval_ema needs scheme.ema_decay > 0")
        if not 0 <= self.policy.threshold <= 1:
            raise ConfigError(f"policy.threshold must be in [0, 1], got {self.policy.threshold}")
        if not 0 <= self.policy.momentum < 1:
            raise ConfigError(f"policy.momentum must be in [0, 1), got {self.policy.momentum}")
        if not 0 <= self.scheme.cutmix_p <= 1:
            raise ConfigError(f"scheme.cutmix_p must be in [0, 1], got {self.scheme.cutmix_p}")
        if self.scheme.cutmix_boxes < 1:
            raise ConfigError(
                f"scheme.cutmix_boxes must be at least 1, got {self.scheme.cutmix_boxes}"
            )
        side = self.scheme.cutmix_side
        if side is not None and (len(side) != 2 or not 0 < side[0] <= side[1] <= 1):
            raise ConfigError(
                f"scheme.cutmix_side must be [lo, hi] with 0 < lo <= hi <= 1, got {side}"
            )
        if not 0 <= self.scheme.teacher_decay < 1:
            raise ConfigError(
                f"scheme.teacher_decay must be in [0, 1), got {self.scheme.teacher_decay}"
            )
        if self.train.amp == "fp16" and not self.train.device.startswith(("cuda", "auto")):
            raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on CPU")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
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
            raise ConfigError(f"unknown key '{dotted}' (known keys here: {known})")
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


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a `Config` from a nested mapping plus dotted overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    merged = _merge(data, parse_overrides(overrides or []))
    cfg = build_dataclass(Config, merged)
    cfg.validate()
    return cfg


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
