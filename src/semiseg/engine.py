"""The one training loop shared by every scheme.

Devices and DDP, the optimiser with backbone/head learning rates and the poly schedule,
AMP, logging (progress bar, JSON lines, TensorBoard), periodic evaluation, atomic
best/latest checkpoints and exact resume all live here; a scheme only turns batches
into a loss. The engine names no method: the scheme's class says which networks and
unlabeled views it needs, and the teaching path (`semiseg.schemes.teaching`) builds the
policy and the unlabeled loss from their registries. The offline pipeline (self-training
rounds, pseudo-label sets, the detector) sits above it and calls it; nothing here imports
it. Only the engine, the offline pipeline and the CLI touch the file system
(`semiseg.run_folder` names every file).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from semiseg.checkpoint import (
    CHECKPOINT_VERSION,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
    seed_everything,
)
from semiseg.config import Config, ConfigError, config_from_saved, config_to_dict, save_config
from semiseg.data.dataset import (
    SegmentationDataset,
    augment_on_device,
    check_samples,
    collate_deferred,
)
from semiseg.data.detections import DetectionCache
from semiseg.data.formats import DataError, DatasetFormat, Sample, get_format, require_masks
from semiseg.data.sampling import ResumableSampler, ShardSampler
from semiseg.data.splits import read_split, resolve_list
from semiseg.data.transforms import TrainTransform, UnlabeledTransform, denormalize, eval_transform
from semiseg.distributed import (
    DistContext,
    all_gather_objects,
    all_gather_pairs,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
)
from semiseg.environment import describe as describe_environment
from semiseg.evaluation import SegmentationScores, evaluate
from semiseg.files import atomic_write, remove_stale_temporaries
from semiseg.metrics_log import MetricsLogger, format_duration
from semiseg.models import build_model
from semiseg.precision import autocast_dtype, describe
from semiseg.pseudo import PolicyContext
from semiseg.run_folder import RunFolder, final_record
from semiseg.schedule import resolve as resolve_schedule
from semiseg.schemes import SCHEMES, Scheme, StepOutput, Teaching, Views, unwrap
from semiseg.stop_signals import StopSignals, TrainingInterrupted, leave_stops_to_the_main_process
from semiseg.warm_start import load_warm_start, load_weights, warm_start_sources

# Keys that change how a run is executed or reported but not what it computes, so a
# resumed run may change them.
RESUMABLE_CHANGES = {
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.device",
    "train.threads",
    "data.workers",
    "data.eval_batch_size",
    "data.check",
    "output_dir",
}


@dataclass
class DataBundle:
    fmt: DatasetFormat
    num_classes: int
    class_names: list[str]
    labeled: list[Sample]
    unlabeled: list[Sample] | None
    val: list[Sample]
    pseudo_labeled: list[Sample] | None = None


def load_data(
    cfg: Config,
    views: Views | None,
    need_pseudo: bool = False,
    detections: DetectionCache | None = None,
    progress: bool = True,
) -> DataBundle:
    """Read the split lists and check the files up front, so bad data fails before training
    starts: the unlabeled list when the scheme reads unlabeled `views`, the pseudo-labeled
    list for offline self-training, the cached detections of the unlabeled images when the
    policy reads them."""
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: dataset folder not found: {root}")
    fmt = get_format(cfg.data.format, cfg.data.num_classes, cfg.data.class_names, root=root)
    if fmt.name == "folder" and fmt.num_classes is None:
        raise DataError(
            f"data.num_classes is needed for the folder format (or write {root / 'classes.txt'} with one class name a line)"
        )
    num_classes = fmt.num_classes
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise DataError(
            f"data.num_classes={cfg.data.num_classes} but the {fmt.name} format has {num_classes} classes"
        )
    class_names = list(fmt.class_names) if fmt.class_names else [str(i) for i in range(num_classes)]
    labeled = read_split(resolve_list(cfg.data.labeled, root), root, require_mask=True)
    unlabeled = None
    if views is not None:
        if not cfg.data.unlabeled:
            raise DataError(
                f"scheme {cfg.scheme.name!r} needs data.unlabeled (a split list of unlabeled images)"
            )
        unlabeled = read_split(resolve_list(cfg.data.unlabeled, root), root, require_mask=False)
    pseudo = None
    if need_pseudo:
        if not cfg.data.pseudo_labeled:
            raise DataError(
                f"scheme {cfg.scheme.name!r} needs data.pseudo_labeled (images with pseudo-label masks)"
            )
        pseudo = read_split(resolve_list(cfg.data.pseudo_labeled, root), root, require_mask=True)
        check_samples(pseudo, fmt, deep=False, desc="check pseudo-labeled", progress=progress)
    if cfg.data.val:
        val = read_split(resolve_list(cfg.data.val, root), root, require_mask=True)
    else:
        val = require_masks(fmt.list_samples(root, "val"), f"{root}: the format's val subset")
    deep = cfg.data.check == "deep"
    check_samples(labeled, fmt, deep=deep, desc="check labeled", progress=progress)
    check_samples(val, fmt, deep=deep, desc="check val", progress=progress)
    if unlabeled is not None and getattr(cfg.scheme, "oracle_eval", False):
        missing = [s.image for s in unlabeled if s.mask is None]
        if missing:
            raise DataError(
                f"scheme.oracle_eval needs a mask on every line of {cfg.data.unlabeled}; "
                f"{len(missing)} have none (first: {missing[0]})"
            )
        # Their masks are decoded too: a broken one would stop the oracle diagnostics mid-run.
        check_samples(unlabeled, fmt, deep=deep, desc="check unlabeled", progress=progress)
    elif unlabeled is not None:
        # Unlabeled masks, where they exist, are never read for training: check images only.
        images = [Sample(s.image, None) for s in unlabeled]
        check_samples(images, fmt, deep=deep, desc="check unlabeled", progress=progress)
    if unlabeled is not None and detections is not None:
        detections.check(len(unlabeled))
    return DataBundle(fmt, num_classes, class_names, labeled, unlabeled, val, pseudo)


class WindowMeans:
    """Per-key means of step logs over a logging window; a float NaN ("not measured this
    step", e.g. no discarded pixels to score) is left out of its key's mean."""

    def __init__(self) -> None:
        self.steps = 0
        self.sums: dict[str, Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor | float]) -> None:
        self.steps += 1
        for key, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: float(total) / self.counts[key] for key, total in self.sums.items()}


def policy_context(cfg: Config, ctx: DistContext) -> PolicyContext:
    """What a policy gets from this run: reductions over processes under DDP, and the seed."""
    distributed = ctx.distributed
    return PolicyContext(
        reduce=all_reduce_sum if distributed else None,
        gather=all_gather_pairs if distributed else None,
        seed=cfg.train.seed,
    )


def build_scheme(
    cfg: Config,
    models: dict[str, nn.Module],
    num_classes: int,
    context: PolicyContext | None = None,
) -> Scheme:
    """The scheme of `cfg` over its networks `models` (name -> network, in the scheme's
    `model_names`), with the policy and unlabeled loss of the teaching path when it has one."""
    scheme_cls = SCHEMES.get(cfg.scheme.name)
    teaching = Teaching.from_config(cfg, num_classes, context) if scheme_cls.teaches else None
    return scheme_cls(cfg, models, num_classes, teaching)


def detection_cache(cfg: Config) -> DetectionCache | None:
    """The cached detections the run's policy reads, if it reads any."""
    found = cfg.policy.detections() if cfg.policy is not None else None
    return DetectionCache(*found) if found is not None else None


def poly_factor(iteration: int, total: int, power: float, start: float = 0.0) -> float:
    """The poly schedule's factor (1 - progress) ** power; `start` is the progress already made
    at iteration 0 (a self-training round that continues its teacher's schedule)."""
    progress = iteration / total if start == 0 else start + (1.0 - start) * iteration / total
    return (1.0 - progress) ** power


def _with_defaults(saved: dict) -> dict:
    """A saved config with options added since it was written filled in by their defaults (and
    an old layout upgraded), so a run resumes under a newer semiseg; one that no longer parses
    is compared as it is."""
    try:
        return config_to_dict(config_from_saved(saved))
    except ConfigError:
        return saved


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        dotted = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append(dotted)
    return out


def optimizer_step(
    scheme: Scheme,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: tuple[dict, dict | None, dict | None],
    iteration: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> StepOutput:
    """One training step of `scheme` on (labeled, unlabeled, mix) batches on `device`: its
    loss under autocast to `dtype` (None: float32), backward through the gradient scaler,
    the optimiser step and the scheme's teacher and EMA updates."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = scheme.training_step(*batches, iteration)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheme.after_optimizer_step(iteration)
    return out


SNAPSHOT_IMAGES = 4
"""Unlabeled images whose per-evaluation snapshots a component keeps (FPL's K maps)."""


def _pace(started: tuple[float, int], iteration: int, total: int) -> str:
    """The wall-clock speed of this process so far, evaluations included, and the time left
    at that speed: the only progress a run started without progress bars (a background
    bench) prints between its evaluations."""
    elapsed, steps = time.perf_counter() - started[0], iteration - started[1]
    if steps <= 0 or iteration >= total:
        return ""
    left = (total - iteration) * elapsed / steps
    return f"; {elapsed / steps:.2f} s/iter, {format_duration(left)} left"


class Trainer:
    """Builds everything a run needs from a `Config` and trains it; `run()` returns the final scores."""

    def __init__(self, cfg: Config, *, restart: bool = False, progress: bool = True):
        self.ctx: DistContext = init_distributed(cfg.train.device, cuda_sync=cfg.train.cuda_sync)
        cfg, schedule_note = resolve_schedule(cfg, self.ctx.world_size)
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.progress = progress and self.ctx.is_main
        if schedule_note and self.ctx.is_main:
            tqdm.write(schedule_note)
        self.folder = RunFolder(cfg.output_dir)
        self.run_dir = self.folder.path
        self.scheme_cls = SCHEMES.get(cfg.scheme.name)
        self.detections = detection_cache(cfg)
        self.data = load_data(
            cfg,
            self.scheme_cls.views,
            self.scheme_cls.uses_pseudo_labels,
            self.detections,
            self.progress,
        )
        self.num_classes = self.data.num_classes

        latest = self.folder.latest
        resuming = latest.exists() and not restart
        warm_starts = {}
        if cfg.model.init_from and not resuming:
            warm_starts = warm_start_sources(cfg.model.init_from, self.scheme_cls.model_names)
            loaded = {
                path: load_warm_start(path, self.num_classes) for path in set(warm_starts.values())
            }
        seed_everything(cfg.train.seed)
        models = {}
        for k, name in enumerate(self.scheme_cls.model_names):
            # Distinct seeds give two-student schemes (CPS) differently initialised networks.
            torch.manual_seed(cfg.train.seed + 1000 * k)
            model = build_model(
                cfg.model.name,
                cfg.model.backbone,
                self.num_classes,
                pretrained=cfg.model.pretrained,
                output_stride=cfg.model.output_stride,
                projection_dim=self.scheme_cls.projection_dim(cfg.scheme),
                decoder=cfg.model.decoder,
                decoder_channels=cfg.model.decoder_channels,
            )
            if name in warm_starts:
                # Before the scheme exists, so teachers and EMA copies start from it too.
                load_weights(model, loaded[warm_starts[name]], warm_starts[name])
            models[name] = self._prepare(model)
        self.scheme: Scheme = build_scheme(
            cfg, models, self.num_classes, policy_context(cfg, self.ctx)
        )
        self.teaching: Teaching | None = getattr(self.scheme, "teaching", None)
        self.optimizer = torch.optim.SGD(
            self.scheme.parameter_groups(cfg.optim.lr, cfg.optim.head_lr_mult),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
        )
        self.autocast_dtype = autocast_dtype(cfg.train.amp, self.ctx.device)
        self.scaler = torch.amp.GradScaler(
            self.ctx.device.type, enabled=self.autocast_dtype == torch.float16
        )
        self.iteration = 0
        self.lr = cfg.optim.lr
        self.best = {"miou": -1.0, "iteration": 0}
        self.last_scores: SegmentationScores | None = None
        # Training randomness starts from the seed, not from wherever model building left it;
        # a resume then replaces it with the saved state.
        seed_everything(cfg.train.seed)
        if resuming:
            self._resume(latest)

    def _prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.ctx.device)
        if self.cfg.train.channels_last:
            model.to_channels_last()
        if self.ctx.distributed:
            # PyTorch's SyncBatchNorm runs on GPUs only; CPU (gloo) runs keep per-process statistics.
            if self.ctx.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # Parameters a step legitimately leaves without gradient would otherwise stop DDP's
            # reducer at the next step. Those the scheme never trains (a PSPNet auxiliary head
            # under a semi-supervised scheme) are taken out of DDP's hands (its documented
            # workaround, pytorch#43690); searching the graph for them instead would forbid the
            # several forward passes per step of FixMatch and UniMatch. Those some steps train
            # (STPG's projection heads, from `match_after` on) need the search.
            untrained = self.scheme_cls.untrained(self.cfg.scheme, model)
            if untrained:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    model, untrained
                )
            unused = self.scheme_cls.may_leave_unused(self.cfg.scheme, model)
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
        if self.cfg.train.compile:
            # Around DDP, so that its optimiser splits the graph at the gradient buckets.
            model = torch.compile(model)
        return model

    # ----------------------------------------------------------------- data
    def _train_loader(
        self,
        samples: list[Sample],
        batch_size: int,
        with_mask: bool,
        seed: int,
        transform: Callable,
        detections: Callable | None = None,
        salt: int = 0,
    ) -> Iterator:
        cfg = self.cfg.data
        on_device = cfg.augment_on == "device"
        dataset = SegmentationDataset(
            samples,
            self.data.fmt,
            transform,
            with_mask=with_mask,
            detections=detections,
            cache=cfg.cache,
            defer=on_device,
        )
        sampler = ResumableSampler(
            len(samples),
            seed,
            rank=self.ctx.rank,
            world=self.ctx.world_size,
            start=self.iteration * batch_size,
            salt=salt,
        )
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=self.ctx.device.type == "cuda",
            drop_last=True,
            persistent_workers=cfg.workers > 0,
            worker_init_fn=leave_stops_to_the_main_process,
            # Its own generator: creating a loader must not draw from the global RNG, whose
            # saved state a resumed run restores (dropout and feature perturbation use it).
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate_deferred if on_device else None,
        )
        if on_device:
            device = self.ctx.device
            return (augment_on_device(batch, transform, device) for batch in loader)
        return iter(loader)

    def _val_loader(self) -> DataLoader:
        cfg = self.cfg.data
        transform = eval_transform(cfg.eval_mode, cfg.eval_size or cfg.crop_size)
        dataset = SegmentationDataset(
            self.data.val, self.data.fmt, transform, with_mask=True, cache=cfg.cache
        )
        sampler = ShardSampler(len(dataset), self.ctx.rank, self.ctx.world_size)
        return DataLoader(
            dataset,
            batch_size=cfg.eval_batch_size,
            sampler=sampler,
            num_workers=min(cfg.workers, 2),
            worker_init_fn=leave_stops_to_the_main_process,
            generator=torch.Generator().manual_seed(0),
        )

    def _weak_transform(self) -> TrainTransform:
        data = self.cfg.data
        return TrainTransform(
            data.crop_size,
            tuple(data.scale_range),
            hflip=data.hflip,
            rotate=data.rotate,
            blur=data.blur,
        )

    def _unlabeled_transform(self, weak: TrainTransform) -> UnlabeledTransform:
        """The weak crop and the strong views and CutMix boxes the scheme declares."""
        views, options = self.scheme_cls.views, self.cfg.scheme
        assert views is not None
        side, area = options.cutmix_side, options.cutmix_area
        return UnlabeledTransform(
            weak,
            cutmix_p=options.cutmix_p,
            cutmix_boxes=options.cutmix_boxes,
            cutmix_side=tuple(side) if side is not None else None,
            strong_views=views.strong,
            boxes=views.boxes,
            cutmix_area=tuple(area) if area is not None else None,
        )

    def _streams(self) -> tuple[Iterator, Iterator | None, Iterator | None]:
        """The labeled stream and, as the scheme asks, the unlabeled and CutMix-source
        streams (or the pseudo-labeled stream of a self-training round)."""
        cfg = self.cfg
        weak = self._weak_transform()
        labeled = self._train_loader(
            self.data.labeled, cfg.data.batch_size, True, cfg.train.seed, weak
        )
        batch_u = cfg.data.unlabeled_batch_size or cfg.data.batch_size
        views = self.scheme_cls.views
        if views is not None:
            assert self.data.unlabeled is not None
            transform = self._unlabeled_transform(weak)
            oracle = getattr(cfg.scheme, "oracle_eval", False)
            boxes = self.detections.bitmask if self.detections is not None else None
            unlabeled = self._train_loader(
                self.data.unlabeled, batch_u, oracle, cfg.train.seed + 1, transform, boxes
            )
            mix = None
            if views.mix:
                # A second, independently drawn unlabeled stream; or (`same_image`, the released
                # code's zip of a loader with itself) the same images augmented anew.
                same = cfg.scheme.cutmix_source == "same_image"
                seed = cfg.train.seed + (1 if same else 2)
                mix = self._train_loader(
                    self.data.unlabeled, batch_u, False, seed, transform, boxes, salt=int(same)
                )
            return labeled, unlabeled, mix
        if self.data.pseudo_labeled is not None:
            # Self-training: pseudo-labeled crops augmented like the labeled ones (DARS Eq. 2).
            return (
                labeled,
                self._train_loader(
                    self.data.pseudo_labeled, batch_u, True, cfg.train.seed + 1, weak
                ),
                None,
            )
        return labeled, None, None

    # ----------------------------------------------------------- checkpoints
    def _checkpoint(self, with_optimizer: bool) -> dict:
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "iteration": self.iteration,
            "config": config_to_dict(self.cfg),
            "num_classes": self.num_classes,
            "class_names": self.data.class_names,
            # Relative data paths of the config are relative to it (semiseg.inference.rebased).
            "workdir": os.getcwd(),
            "models": {name: unwrap(m).state_dict() for name, m in self.scheme.models.items()},
            "eval_model": self.scheme.eval_model().state_dict(),
            "best": dict(self.best),
        }
        if with_optimizer:
            ckpt["optimizer"] = self.optimizer.state_dict()
            ckpt["scaler"] = self.scaler.state_dict()
            ckpt["scheme"] = self.scheme.state_dict()
        return ckpt

    def _save_latest(self) -> None:
        # Every rank's RNG is gathered so a resumed multi-process run continues each stream.
        rng = all_gather_objects(self.ctx, capture_rng())
        if self.ctx.is_main:
            ckpt = self._checkpoint(with_optimizer=True)
            ckpt["rng"] = rng
            save_atomic(ckpt, self.folder.latest)
        barrier(self.ctx)

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.ctx.device)
        changed = [
            k
            for k in _config_differences(_with_defaults(ckpt["config"]), config_to_dict(self.cfg))
            if k not in RESUMABLE_CHANGES
        ]
        if changed:
            raise ConfigError(
                f"{path} was written by a run with a different config (differs in: {', '.join(changed)}); "
                "use another output_dir, or pass --restart to train from scratch and overwrite it"
            )
        for name, model in self.scheme.models.items():
            unwrap(model).load_state_dict(ckpt["models"][name])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.scheme.load_state_dict(ckpt["scheme"])
        self.iteration = ckpt["iteration"]
        self.best = ckpt["best"]
        rng = ckpt.get("rng") or []
        if len(rng) == self.ctx.world_size:
            restore_rng(rng[self.ctx.rank])
        else:
            seed_everything(self.cfg.train.seed + self.iteration)
        if self.ctx.is_main:
            tqdm.write(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------- training
    def _set_lr(self, iteration: int) -> float:
        optim = self.cfg.optim
        factor = poly_factor(
            iteration, self.cfg.train.iterations, optim.poly_power, optim.poly_start
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * group["lr_mult"] * factor
        return self.cfg.optim.lr * factor

    def step_on(self, labeled: dict, unlabeled: dict | None, mix: dict | None, iteration: int):
        """One optimiser step of the scheme on the given (device) batches: the learning rate
        of `iteration`, the scheme's loss under autocast, backward, SGD, teacher/EMA updates.
        Returns the scheme's `StepOutput`."""
        self.lr = self._set_lr(iteration)
        return optimizer_step(
            self.scheme,
            self.optimizer,
            self.scaler,
            (labeled, unlabeled, mix),
            iteration,
            self.ctx.device,
            self.autocast_dtype,
        )

    def evaluate(self) -> SegmentationScores:
        data = self.cfg.data
        return evaluate(
            self.scheme.eval_model(),
            self._val_loader(),
            self.num_classes,
            device=self.ctx.device,
            mode=data.eval_mode,
            window=data.eval_size or data.crop_size,
            tail_classes=self.cfg.eval.tail_classes,
            progress=self.progress,
        )

    def _after_eval(
        self, scores: SegmentationScores, logger: MetricsLogger | None, pace: str = ""
    ) -> None:
        self.last_scores = scores
        improved = scores.miou > self.best["miou"]
        if improved:
            self.best = {"miou": scores.miou, "iteration": self.iteration}
        if logger is None:
            return
        logger.log(self.iteration, "val", scores.as_dict(self.data.class_names))
        self._save_snapshots()
        if improved:
            ckpt = self._checkpoint(with_optimizer=False)
            ckpt["scores"] = scores.as_dict(self.data.class_names)
            save_atomic(ckpt, self.folder.best)
        tqdm.write(
            f"[iter {self.iteration}] val mIoU {100 * scores.miou:.2f} "
            f"(best {100 * self.best['miou']:.2f} @ {self.best['iteration']}){pace}"
        )

    @torch.no_grad()
    def _save_snapshots(self) -> None:
        """Per-evaluation arrays of the components that keep them (FPL's K maps): the evaluated
        network predicts the first few unlabeled images (validation preprocessing, no
        augmentation), each component turns the probabilities into arrays, and they are
        stored with the images in RUN/<component's folder>/iter_NNNNNN.npz."""
        if self.teaching is None or not self.data.unlabeled:
            return
        keepers = [
            c
            for c in (self.teaching.policy, self.teaching.loss)
            if getattr(c, "snapshot_dir", None)
        ]
        if not keepers:
            return
        data = self.cfg.data
        transform = eval_transform("resize", data.eval_size or data.crop_size)
        dataset = SegmentationDataset(
            self.data.unlabeled[:SNAPSHOT_IMAGES], self.data.fmt, transform, with_mask=False
        )
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(self.ctx.device)
        model = self.scheme.eval_model()
        was_training = model.training
        model.eval()
        probs = model(images).logits.float().softmax(dim=1)
        model.train(was_training)
        shown = denormalize(images.cpu()).permute(0, 2, 3, 1).numpy()
        for component in keepers:
            arrays = component.snapshot(probs)
            if arrays is None:
                continue
            buffer = io.BytesIO()
            np.savez_compressed(buffer, images=shown, iteration=np.int64(self.iteration), **arrays)
            content = buffer.getvalue()
            path = self.folder.snapshot(component.snapshot_dir, self.iteration)
            atomic_write(path, lambda tmp, content=content: Path(tmp).write_bytes(content))

    def run(self) -> dict:
        cfg = self.cfg
        total = cfg.train.iterations
        logger = None
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # What writes a kill interrupted left behind (a half-written latest.pt, ...).
            remove_stale_temporaries(self.run_dir)
            save_config(cfg, self.folder.config)
            self.folder.record_environment(
                {"iteration": self.iteration, **describe_environment(self.ctx.device)}
            )
            logger = MetricsLogger(self.run_dir, resume_iteration=self.iteration)
            params = sum(p.numel() for m in self.scheme.models.values() for p in m.parameters())
            unlabeled = len(self.data.unlabeled) if self.data.unlabeled is not None else 0
            tqdm.write(
                f"{cfg.scheme.name}: {cfg.model.name}/{cfg.model.backbone} ({params / 1e6:.1f}M parameters) "
                f"on {self.ctx.device} x{self.ctx.world_size}, {describe(self.autocast_dtype)}"
                f"{', channels-last' if cfg.train.channels_last else ''}; {len(self.data.labeled)} labeled, "
                f"{unlabeled} unlabeled, {len(self.data.val)} val samples; run folder {self.run_dir}"
            )
        try:
            result = self._loop(logger, total)
        finally:
            if logger is not None:
                logger.close()
            cleanup(self.ctx)
        return result

    @torch.no_grad()
    def _warm_up_policy(self, transform: TrainTransform) -> None:
        """`policy.warmup` labeled batches, from a stream of their own (the training streams
        are untouched, so a resume stays exact), update the policy's statistics."""
        cfg = self.cfg
        assert self.teaching is not None
        model = self.scheme.models[self.scheme_cls.model_names[0]]
        stream = self._train_loader(
            self.data.labeled, cfg.data.batch_size, True, cfg.train.seed + 3, transform
        )
        model.eval()
        for _ in tqdm(
            range(cfg.policy.warmup),
            desc="policy warm-up",
            disable=not self.progress,
            dynamic_ncols=True,
        ):
            batch = Scheme.to_device(next(stream), self.ctx.device)
            self.teaching.observe(model(batch["image"]), batch["mask"])
        model.train()

    def _loop(self, logger: MetricsLogger | None, total: int) -> dict:
        cfg = self.cfg
        streams = self._streams()
        if self.iteration == 0 and self.teaching is not None and cfg.policy.warmup:
            self._warm_up_policy(self._weak_transform())
        checkpoint_every = cfg.train.checkpoint_every or cfg.train.eval_every
        self.scheme.train()
        bar = tqdm(
            total=total,
            initial=self.iteration,
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        window_start, window = time.perf_counter(), WindowMeans()
        started = (window_start, self.iteration)
        with StopSignals() as stop:
            while self.iteration < total:
                waited = time.perf_counter()
                labeled, unlabeled, mix = self._next_batches(stop, streams)
                waited = time.perf_counter() - waited
                out = self.step_on(labeled, unlabeled, mix, self.iteration)
                self.iteration += 1
                bar.update(1)
                window.add({"loss": out.loss.detach(), "data_sec_per_iter": waited, **out.logs})
                if self.iteration % cfg.train.log_every == 0 or self.iteration == total:
                    self._log_window(window, window_start, logger, bar)
                    window_start, window = time.perf_counter(), WindowMeans()
                evaluated = self.iteration % cfg.train.eval_every == 0 or self.iteration == total
                if evaluated:
                    self._after_eval(self.evaluate(), logger, _pace(started, self.iteration, total))
                saved = self.iteration % checkpoint_every == 0 or self.iteration == total
                if saved:
                    self._save_latest()
                if evaluated:
                    # Evaluation time is not training time.
                    window_start = time.perf_counter()
                if self.iteration < total and self._stop_requested(stop):
                    if not saved:
                        self._save_latest()
                    bar.close()
                    raise TrainingInterrupted(stop.name(), self.iteration, self.folder.latest)
        bar.close()
        return self._finish()

    def _next_batches(
        self, stop: StopSignals, streams: tuple
    ) -> tuple[dict, dict | None, dict | None]:
        """The next labeled, unlabeled and mix batches (None for a stream the scheme lacks)."""
        device = self.ctx.device
        try:
            labeled, unlabeled, mix = (
                Scheme.to_device(next(s), device) if s is not None else None for s in streams
            )
        except Exception:
            # A stop signal sent to the whole process group also ends the loader workers.
            if stop.received is None:
                raise
            self._save_latest()
            raise TrainingInterrupted(stop.name(), self.iteration, self.folder.latest) from None
        return labeled, unlabeled, mix

    def _log_window(
        self, window: WindowMeans, start: float, logger: MetricsLogger | None, bar: tqdm
    ) -> None:
        means = window.means()
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(
                f"training loss is {means['loss']} at iteration {self.iteration}; "
                "lower optim.lr or check the data (the last checkpoint is intact)"
            )
        means["lr"] = self.lr
        means["sec_per_iter"] = (time.perf_counter() - start) / window.steps
        # The share of a step spent waiting for the data loaders (0: never the bottleneck).
        means["data_wait_share"] = means["data_sec_per_iter"] / max(means["sec_per_iter"], 1e-12)
        if logger is not None:
            logger.log(self.iteration, "train", means)
        bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{self.lr:.2e}")

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether a process got SIGINT or SIGTERM; under DDP every process learns it at the
        same step boundary, so all of them write the checkpoint together."""
        asked = stop.received is not None
        if not self.ctx.distributed:
            return asked
        return bool(all_reduce_sum(torch.tensor([float(asked)], device=self.ctx.device)).item() > 0)

    def _finish(self) -> dict:
        """Write final.json. A run that was already finished (its command run again) trained and
        evaluated nothing now: it keeps the scores its final.json holds."""
        scores = (
            self.last_scores.as_dict(self.data.class_names)
            if self.last_scores is not None
            else None
        )
        if scores is None:
            previous = self.folder.read_final() or {}
            if previous.get("iteration") == self.iteration:
                scores = previous.get("final")
        final = final_record(self.iteration, self.best["miou"], self.best["iteration"], scores)
        if self.ctx.is_main:
            self.folder.write_final(final)
        return final
