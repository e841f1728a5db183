"""Figures from a run's metrics log: DAW-style confidence fits with t*, and pseudo-label curves.

`semiseg plot RUN` reads RUN/metrics.jsonl and writes PNGs into RUN/plots/:
- `daw_fits.png`: the truncated Gaussians of correct (positive) and incorrect (negative)
  confidences on [1/C, 1], with t*, at chosen iterations (DAW paper Fig. 2/4 style);
- `pseudo_labels.png`: t*, the fraction of unlabeled pixels used, and (under
  `scheme.oracle_eval`) the accuracy of used and discarded pseudo labels over training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import truncnorm

from semiseg.files import atomic_write
from semiseg.metrics_log import read_metrics

FIT_KEYS = ("policy/mu_pos", "policy/sigma_pos", "policy/mu_neg", "policy/sigma_neg", "policy/t")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def truncated_pdf(x: np.ndarray, mu: float, sigma: float, low: float, high: float = 1.0) -> np.ndarray:
    """Density of N(mu, sigma^2) truncated to [low, high] (DAW Eq. 3-4)."""
    a, b = (low - mu) / sigma, (high - mu) / sigma
    return truncnorm.pdf(x, a, b, loc=mu, scale=sigma)


def plot_daw_fits(records: list[dict], num_classes: int, out: Path, iterations: Sequence[int] | None = None) -> Path:
    fits = [r for r in records if r["split"] == "train" and all(k in r for k in FIT_KEYS)]
    if not fits:
        raise ValueError("no DAW statistics (policy/mu_pos, ...) in this run's metrics: was it trained with policy.name=daw?")
    if iterations:
        wanted = [min(fits, key=lambda r, i=i: abs(r["iteration"] - i)) for i in iterations]
    else:
        picks = np.linspace(0, len(fits) - 1, num=min(4, len(fits))).round().astype(int)
        wanted = [fits[i] for i in picks]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(wanted), figsize=(4 * len(wanted), 3.2), squeeze=False)
    low = 1.0 / num_classes
    x = np.linspace(low, 1.0, 400)
    for ax, r in zip(axes[0], wanted, strict=True):
        ax.plot(x, truncated_pdf(x, r["policy/mu_pos"], r["policy/sigma_pos"], low), label="correct", color="#2a9d8f")
        ax.plot(x, truncated_pdf(x, r["policy/mu_neg"], r["policy/sigma_neg"], low), label="incorrect", color="#e76f51")
        t = r["policy/t"]
        # An early, ill-conditioned t* can fall outside [1/C, 1]; draw it at the edge, say so.
        outside = "" if low <= t <= 1 else " (outside [1/C, 1])"
        ax.axvline(min(max(t, low), 1.0), color="black", linestyle="--", linewidth=1, label=f"t* = {t:.3f}{outside}")
        ax.set_xlim(low, 1.0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"iteration {r['iteration']}")
        ax.set_xlabel("confidence")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    path = out / "daw_fits.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_pseudo_label_curves(records: list[dict], out: Path) -> Path:
    train = [r for r in records if r["split"] == "train"]
    series = {
        "t*": "policy/t",
        "fraction of pixels used": "mask_ratio",
        "accuracy of used pseudo labels": "oracle/acc_used",
        "accuracy of discarded pseudo labels": "oracle/acc_discarded",
    }
    present = {label: key for label, key in series.items() if any(key in r for r in train)}
    if not present:
        raise ValueError("no pseudo-label diagnostics in this run's metrics (a supervised run?)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, key in present.items():
        points = [(r["iteration"], r[key]) for r in train if key in r]
        ax.plot(*zip(*points, strict=True), label=label)
    ax.set_xlabel("iteration")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "pseudo_labels.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_run(run: Path, num_classes: int, iterations: Sequence[int] | None = None) -> list[Path]:
    """Write every figure this run's metrics support; returns their paths."""
    records = read_metrics(run / "metrics.jsonl")
    out = run / "plots"
    paths = [plot_pseudo_label_curves(records, out)]
    if any("policy/mu_pos" in r for r in records):
        paths.append(plot_daw_fits(records, num_classes, out, iterations))
    return paths
