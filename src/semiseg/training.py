"""`semiseg train`'s entry point: one run of the engine, or the offline pipeline around it.

A scheme that learns from offline pseudo labels (`uses_pseudo_labels`: self-training)
without a `data.pseudo_labeled` list runs its rounds (`semiseg.offline.rounds`), each an
engine run; every other config is one `Trainer` run. This module sits above both, so the
engine never imports the offline pipeline.
"""

from __future__ import annotations

from semiseg.config import Config
from semiseg.engine import Trainer
from semiseg.schemes import SCHEMES


def train(cfg: Config, *, restart: bool = False, progress: bool = True) -> dict:
    """Train `cfg` to the end (resuming its run folder); returns what final.json holds."""
    if SCHEMES.get(cfg.scheme.name).uses_pseudo_labels and not cfg.data.pseudo_labeled:
        from semiseg.offline.rounds import self_train

        return self_train(cfg, restart=restart, progress=progress)
    return Trainer(cfg, restart=restart, progress=progress).run()
