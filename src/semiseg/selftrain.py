"""Offline self-training in rounds (DARS, He et al., ICCV 2021, Sec. 3), as one resumable run.

Round 0 trains on the labeled images only (Eq. 1), unless `model.init_from` names a
checkpoint that stands for it. Each round k >= 1 then

1. labels every unlabeled image with the previous round's model (`semiseg.pseudolabel`,
   generator `selftrain.method`, labeling ratio `selftrain.alpha[k-1]`) into
   OUTPUT/roundK/pseudo/, and
2. trains a student that starts from the previous round's weights on labeled +
   pseudo-labeled crops (Eq. 2, scheme `self_training`) for `train.iterations`, with the
   random-scale range widened to [(1 - beta_min) s_min, (1 + beta_max) s_max] (Sec. 3.3).

Each round is an ordinary run folder (OUTPUT/round0, OUTPUT/round1, ...); running the same
command again skips finished rounds, resumes the pseudo-label pass where it stopped and the
round's training from its last checkpoint. OUTPUT/final.json (written after the last round)
holds the per-round scores and pseudo-label statistics (KL divergence to the labeled class
distribution, class counts before and after sampling).

Unlike the released code, each round restarts the poly schedule and the optimiser from the
teacher's weights instead of continuing the previous round's epoch counter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from semiseg.config import Config, ConfigError, save_config
from semiseg.distributed import cleanup, init_distributed
from semiseg.files import atomic_write_text
from semiseg.pseudolabel import GeneratorSpec, pseudo_label_checkpoint


def round_dir(cfg: Config, k: int) -> Path:
    return Path(cfg.output_dir) / f"round{k}"


def widened_scale(
    scale: list[float] | tuple[float, float], beta_min: float, beta_max: float
) -> list[float]:
    """Sec. 3.3: [s_min, s_max] -> [(1 - beta_min) s_min, (1 + beta_max) s_max]."""
    return [(1 - beta_min) * scale[0], (1 + beta_max) * scale[1]]


def round_config(cfg: Config, k: int, teacher: Path | None) -> Config:
    """The config of round k: round 0 is supervised; later rounds self-train from `teacher`."""
    out = round_dir(cfg, k)
    if k == 0:
        scheme = dataclasses.replace(cfg.scheme, name="supervised")
        return dataclasses.replace(cfg, scheme=scheme, output_dir=str(out))
    st = cfg.selftrain
    data = dataclasses.replace(
        cfg.data,
        pseudo_labeled=str(out / "pseudo" / "list.txt"),
        scale_range=widened_scale(cfg.data.scale_range, st.beta_min[k - 1], st.beta_max[k - 1]),
    )
    model = dataclasses.replace(cfg.model, init_from=str(teacher))
    return dataclasses.replace(cfg, data=data, model=model, output_dir=str(out))


def generator_spec(cfg: Config, k: int) -> GeneratorSpec:
    st = cfg.selftrain
    fixed = st.method == "st" and st.threshold is not None
    return GeneratorSpec(
        method=st.method,
        alpha=None if fixed else st.alpha[k - 1],
        threshold=st.threshold if fixed else None,
        temperature=st.temperature,
        variant=st.variant,
    )


def _finished(folder: Path, iterations: int) -> dict | None:
    path = folder / "final.json"
    if not path.is_file():
        return None
    final = json.loads(path.read_text())
    return final if final.get("iteration") == iterations else None


def pseudo_label_round(cfg: Config, k: int, teacher: Path, progress: bool) -> dict:
    """Step 1 of round k: the previous model labels the unlabeled set (resumable)."""
    if not cfg.data.unlabeled:
        raise ConfigError("self-training needs data.unlabeled (the images to pseudo-label)")
    stats, _ = pseudo_label_checkpoint(
        teacher,
        round_dir(cfg, k) / "pseudo",
        generator_spec(cfg, k),
        data_root=cfg.data.root,
        unlabeled=cfg.data.unlabeled,
        labeled=cfg.data.labeled,
        flip=cfg.selftrain.flip,
        seed=cfg.train.seed + k,
        device=cfg.train.device,
        progress=progress,
    )
    return stats


def self_train(cfg: Config, *, restart: bool = False, progress: bool = True) -> dict:
    """Every round of `cfg` (scheme `self_training`, no `data.pseudo_labeled`); see the module."""
    # One process group for every round and pseudo-label pass (see DistContext.owner).
    ctx = init_distributed(cfg.train.device)
    try:
        return _rounds(cfg, restart, progress)
    finally:
        cleanup(ctx)


def _rounds(cfg: Config, restart: bool, progress: bool) -> dict:
    from semiseg.engine import train, warm_start_sources

    iterations = cfg.train.iterations
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    rounds = []
    if cfg.model.init_from:
        (source,) = warm_start_sources(cfg.model.init_from, ("student",)).values()
        teacher = Path(source)
        rounds.append({"round": 0, "checkpoint": str(teacher)})
    else:
        folder = round_dir(cfg, 0)
        final = _finished(folder, iterations) if not restart else None
        if final is None:
            final = train(round_config(cfg, 0, None), restart=restart, progress=progress)
        teacher = folder / "latest.pt"
        rounds.append({"round": 0, "checkpoint": str(teacher), **_scores(final)})
    for k in range(1, len(cfg.selftrain.alpha) + 1):
        round_cfg = round_config(cfg, k, teacher)
        final = None if restart else _finished(round_dir(cfg, k), iterations)
        stats = pseudo_label_round(cfg, k, teacher, progress)
        if final is None:
            final = train(round_cfg, restart=restart, progress=progress)
        teacher = round_dir(cfg, k) / "latest.pt"
        rounds.append(
            {
                "round": k,
                "checkpoint": str(teacher),
                "alpha": cfg.selftrain.alpha[k - 1],
                "scale_range": round_cfg.data.scale_range,
                **_scores(final),
                **{
                    key: stats.get(key)
                    for key in ("kl_thresholded", "kl_final", "targets", "thresholded", "final")
                },
            }
        )
    last = rounds[-1]
    summary = {
        "iteration": iterations,
        "rounds": rounds,
        "metrics_dir": f"round{last['round']}",
        "kl": last.get("kl_final"),
    }
    atomic_write_text(Path(cfg.output_dir) / "final.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _scores(final: dict) -> dict:
    scores = final.get("final", {})
    return {
        "best_miou": final.get("best_miou"),
        "miou": scores.get("miou"),
        "tail_miou": scores.get("tail_miou"),
    }
