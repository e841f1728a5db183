"""Offline self-training in rounds (DARS, He et al., ICCV 2021, Sec. 3), as one resumable run.

Round 0 trains on the labeled images only (Eq. 1), unless `model.init_from` names a
checkpoint that stands for it. Each round k >= 1 then

1. labels every unlabeled image with the previous round's model (`semiseg.offline.label_set`,
   generator `scheme.method`, labeling ratio `scheme.alpha[k-1]`) into
   OUTPUT/roundK/pseudo/, and
2. trains a student that starts from the previous round's weights on labeled +
   pseudo-labeled crops (Eq. 2, scheme `self_training`) for `train.iterations`, with the
   random-scale range widened to [(1 - beta_min) s_min, (1 + beta_max) s_max] (Sec. 3.3).

Each round is an ordinary run folder (OUTPUT/round0, OUTPUT/round1, ...); running the same
command again skips finished rounds, resumes the pseudo-label pass where it stopped and the
round's training from its last checkpoint; `--restart` retrains every round and labels the
unlabeled set again with each new teacher. OUTPUT/final.json (written after the last round,
in the one shape of `semiseg.run_folder.final_record`) holds the last round's scores, the
per-round scores and pseudo-label statistics (KL divergence to the labeled class
distribution, class counts before and after sampling). The generator and the rounds are the
options of scheme `self_training` (`semiseg.schemes.self_training.SelfTrainingOptions`).

Each round starts the optimiser afresh from its teacher's weights. The poly schedule starts
afresh too, unless `scheme.continue_schedule` (the released code, which resumes round k at
the epoch where round k-1 ended: its learning rate jumps back to (1/(k+1))^0.9 of the base
and decays from there); its momentum buffers are not carried over.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from semiseg.config import Config, save_config
from semiseg.distributed import cleanup, init_distributed
from semiseg.engine import Trainer
from semiseg.offline.label_set import GeneratorSpec, pseudo_label_checkpoint
from semiseg.options import ConfigError
from semiseg.run_folder import PseudoLabelFolder, RunFolder, final_record
from semiseg.schedule import planned_iterations
from semiseg.schemes import SCHEMES
from semiseg.schemes.self_training import SelfTrainingOptions
from semiseg.warm_start import warm_start_sources


def round_folder(cfg: Config, k: int) -> RunFolder:
    return RunFolder(cfg.output_dir).round(k)


def widened_scale(
    scale: list[float] | tuple[float, float], beta_min: float, beta_max: float
) -> list[float]:
    """Sec. 3.3: [s_min, s_max] -> [(1 - beta_min) s_min, (1 + beta_max) s_max]."""
    return [(1 - beta_min) * scale[0], (1 + beta_max) * scale[1]]


def _supervised_options(options: SelfTrainingOptions):
    """The supervised scheme's options with the values the self-training options share
    (evaluation EMA, auxiliary head weight)."""
    supervised = SCHEMES.options("supervised")
    shared = {f.name for f in dataclasses.fields(supervised)} - {"name"}
    return supervised(**{key: getattr(options, key) for key in shared})


def round_config(cfg: Config, k: int, teacher: Path | None) -> Config:
    """The config of round k: round 0 is supervised; later rounds self-train from `teacher`."""
    out = round_folder(cfg, k)
    if k == 0:
        return dataclasses.replace(
            cfg, scheme=_supervised_options(cfg.scheme), output_dir=str(out.path)
        )
    st = cfg.scheme
    data = dataclasses.replace(
        cfg.data,
        pseudo_labeled=str(PseudoLabelFolder(out.pseudo_labels).split_list),
        scale_range=widened_scale(cfg.data.scale_range, st.beta_min[k - 1], st.beta_max[k - 1]),
    )
    model = dataclasses.replace(cfg.model, init_from=str(teacher))
    # DARS' released code resumes round k at the epoch where round k-1 ended (rounds of equal
    # length): its poly schedule goes on from k/(k+1) instead of starting afresh.
    optim = dataclasses.replace(cfg.optim, poly_start=k / (k + 1) if st.continue_schedule else 0.0)
    return dataclasses.replace(cfg, data=data, model=model, optim=optim, output_dir=str(out.path))


def generator_spec(options: SelfTrainingOptions, k: int) -> GeneratorSpec:
    fixed = options.method == "st" and options.threshold is not None
    return GeneratorSpec(
        method=options.method,
        alpha=None if fixed else options.alpha[k - 1],
        threshold=options.threshold if fixed else None,
        temperature=options.temperature,
        variant=options.variant,
    )


def _finished(folder: RunFolder, iterations: int) -> dict | None:
    final = folder.read_final()
    return final if final is not None and final.get("iteration") == iterations else None


def pseudo_label_round(
    cfg: Config, k: int, teacher: Path, progress: bool, restart: bool = False
) -> dict:
    """Step 1 of round k: the previous model labels the unlabeled set (resumable; `restart`
    labels it again from scratch)."""
    if not cfg.data.unlabeled:
        raise ConfigError("self-training needs data.unlabeled (the images to pseudo-label)")
    stats, _ = pseudo_label_checkpoint(
        teacher,
        round_folder(cfg, k).pseudo_labels,
        generator_spec(cfg.scheme, k),
        data_root=cfg.data.root,
        unlabeled=cfg.data.unlabeled,
        labeled=cfg.data.labeled,
        flip=cfg.scheme.flip,
        seed=cfg.train.seed + k,
        device=cfg.train.device,
        device_key="train.device",
        base_size=cfg.scheme.teacher_size,
        progress=progress,
        restart=restart,
    )
    return stats


def self_train(cfg: Config, *, restart: bool = False, progress: bool = True) -> dict:
    """Every round of `cfg` (scheme `self_training`, no `data.pseudo_labeled`); see the module."""
    # One process group for every round and pseudo-label pass (see DistContext.owner).
    ctx = init_distributed(cfg.train.device, cuda_sync=cfg.train.cuda_sync)
    try:
        return _rounds(cfg, restart, progress, ctx.world_size)
    finally:
        cleanup(ctx)


def _train(cfg: Config, restart: bool, progress: bool) -> dict:
    return Trainer(cfg, restart=restart, progress=progress).run()


def _rounds(cfg: Config, restart: bool, progress: bool, processes: int) -> dict:
    iterations = planned_iterations(cfg, processes)
    top = RunFolder(cfg.output_dir)
    save_config(cfg, top.config)
    rounds = []
    if cfg.model.init_from:
        (source,) = warm_start_sources(cfg.model.init_from, ("student",)).values()
        teacher = Path(source)
        rounds.append({"round": 0, "checkpoint": str(teacher)})
    else:
        folder = round_folder(cfg, 0)
        round_cfg = round_config(cfg, 0, None)
        final = _finished(folder, planned_iterations(round_cfg, processes)) if not restart else None
        if final is None:
            final = _train(round_cfg, restart, progress)
        teacher = folder.latest
        rounds.append({"round": 0, "checkpoint": str(teacher), **_scores(final)})
    final = None
    for k in range(1, len(cfg.scheme.alpha) + 1):
        round_cfg = round_config(cfg, k, teacher)
        folder = round_folder(cfg, k)
        final = None if restart else _finished(folder, planned_iterations(round_cfg, processes))
        stats = pseudo_label_round(cfg, k, teacher, progress, restart=restart)
        if final is None:
            final = _train(round_cfg, restart, progress)
        teacher = folder.latest
        rounds.append(
            {
                "round": k,
                "checkpoint": str(teacher),
                "alpha": cfg.scheme.alpha[k - 1],
                "scale_range": round_cfg.data.scale_range,
                **_scores(final),
                **{
                    key: stats.get(key)
                    for key in ("kl_thresholded", "kl_final", "targets", "thresholded", "final")
                },
            }
        )
    last = rounds[-1]
    summary = final_record(
        iterations,
        final["best_miou"] if final else -1.0,
        final["best_iteration"] if final else 0,
        final.get("final") if final else None,
        metrics_dir=f"round{last['round']}",
        rounds=rounds,
        kl=last.get("kl_final"),
    )
    top.write_final(summary)
    return summary


def _scores(final: dict) -> dict:
    scores = final.get("final") or {}
    return {
        "best_miou": final.get("best_miou"),
        "miou": scores.get("miou"),
        "tail_miou": scores.get("tail_miou"),
    }
