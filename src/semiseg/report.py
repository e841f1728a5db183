"""Figures from a run's metrics log: training curves, pseudo-label curves, each method's panels.

`semiseg plot RUN` reads RUN/metrics.jsonl and writes PNGs into RUN/plots/:
- `training_curves.png` (every run): the loss terms, the learning rate and val mIoU / tail
  mIoU over training;
- `daw_fits.png`: the truncated Gaussians of correct (positive) and incorrect (negative)
  confidences on [1/C, 1], with t*, at chosen iterations (DAW paper Fig. 2/4 style);
- `pseudo_labels.png`: t*, the fraction of unlabeled pixels used, and (under
  `scheme.oracle_eval`) the accuracy of used and discarded pseudo labels and the
  weight-averaged accuracy over training;
- with `--compare RUN2 ...`: `val_miou_comparison.png`, each run's val mIoU over training,
  and, when every run logged it, `pseudo_label_accuracy.png`, the weight-averaged
  pseudo-label accuracy of each (a weighting policy against its threshold-only baseline);
- STPG runs: `stpg_mismatch.png` (per-class mismatch scores and the shares of consistent,
  highly and lowly mismatched pixels over training);
- FPL runs: `fpl_k_histogram.png` (share of pixels per K over training, Fig. 4a),
  `fpl_k_maps.png` (K maps of a few unlabeled images across training, Fig. 5) and, under
  `scheme.oracle_eval`, `fpl_gradient_scores.png` (mean R of FPL vs cross-entropy per case,
  Fig. 3b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import truncnorm

from semiseg.files import atomic_write
from semiseg.metrics_log import read_metrics
from semiseg.pseudo.fpl import FuzzyPositiveLoss
from semiseg.run_folder import RunFolder, read_snapshots

FIT_KEYS = ("policy/mu_pos", "policy/sigma_pos", "policy/mu_neg", "policy/sigma_neg", "policy/t")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, tight: bool = True) -> Path:
    """Write `fig` to `path` atomically and close it (a colorbar spanning axes needs tight=False)."""
    if tight:
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    _pyplot().close(fig)
    return path


def truncated_pdf(
    x: np.ndarray, mu: float, sigma: float, low: float, high: float = 1.0
) -> np.ndarray:
    """Density of N(mu, sigma^2) truncated to [low, high] (DAW Eq. 3-4)."""
    a, b = (low - mu) / sigma, (high - mu) / sigma
    return truncnorm.pdf(x, a, b, loc=mu, scale=sigma)


def plot_daw_fits(
    records: list[dict], num_classes: int, out: Path, iterations: Sequence[int] | None = None
) -> Path:
    fits = [r for r in records if r["split"] == "train" and all(k in r for k in FIT_KEYS)]
    if not fits:
        raise ValueError(
            "no DAW statistics (policy/mu_pos, ...) in this run's metrics: was it trained with policy.name=daw?"
        )
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
        ax.plot(
            x,
            truncated_pdf(x, r["policy/mu_pos"], r["policy/sigma_pos"], low),
            label="correct",
            color="#2a9d8f",
        )
        ax.plot(
            x,
            truncated_pdf(x, r["policy/mu_neg"], r["policy/sigma_neg"], low),
            label="incorrect",
            color="#e76f51",
        )
        t = r["policy/t"]
        # An early, ill-conditioned t* can fall outside [1/C, 1]; draw it at the edge, say so.
        outside = "" if low <= t <= 1 else " (outside [1/C, 1])"
        ax.axvline(
            min(max(t, low), 1.0),
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"t* = {t:.3f}{outside}",
        )
        ax.set_xlim(low, 1.0)
        ax.set_ylim(bottom=0)
        ax.set_title(f"iteration {r['iteration']}")
        ax.set_xlabel("confidence")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    return _save(fig, out / "daw_fits.png")


SERIES_STYLES = [
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1)), "v"),
    ((0, (1, 1)), "x"),
]
"""Line style and marker per series, so that series that coincide stay distinguishable."""


def _styled_plot(ax, points: list[tuple[int, float]], label: str, index: int) -> None:
    style, marker = SERIES_STYLES[index % len(SERIES_STYLES)]
    every = max(1, len(points) // 8)
    ax.plot(
        *zip(*points, strict=True),
        label=label,
        linestyle=style,
        marker=marker,
        markevery=every,
        markersize=4,
    )


def plot_training_curves(records: list[dict], out: Path, title: str = "") -> Path:
    """Every run: the logged loss terms, the learning rate, and val mIoU (and tail mIoU) over
    training."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    if not train:
        raise ValueError("no training records in this run's metrics (metrics.jsonl)")
    plt = _pyplot()
    fig, (losses, rate, scores) = plt.subplots(1, 3, figsize=(14, 3.8))
    keys = sorted(
        {k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k)
    )
    for i, key in enumerate(keys):
        _styled_plot(
            losses,
            [(r["iteration"], r[key]) for r in train if key in r],
            "total" if key == "loss" else key,
            i,
        )
    losses.set_xlabel("iteration")
    losses.set_ylabel("loss (mean over the logging window)")
    losses.set_title("training losses")
    losses.set_yscale("log")
    losses.legend(fontsize=7)
    rate.plot(
        [r["iteration"] for r in train if "lr" in r],
        [r["lr"] for r in train if "lr" in r],
        color="#457b9d",
    )
    rate.set_xlabel("iteration")
    rate.set_ylabel("backbone learning rate")
    rate.set_title("learning rate (poly schedule)")
    if val:
        for i, (key, label) in enumerate((("miou", "mIoU"), ("tail_miou", "tail mIoU"))):
            points = [(r["iteration"], 100 * r[key]) for r in val if key in r]
            if points:
                _styled_plot(scores, points, label, i)
        scores.legend(fontsize=8)
    else:
        scores.text(
            0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=scores.transAxes
        )
    scores.set_xlabel("iteration")
    scores.set_ylabel("val IoU (%)")
    scores.set_title("validation")
    if title:
        fig.suptitle(title)
    return _save(fig, out / "training_curves.png")


def _same_series(records: list[dict], a: str, b: str) -> bool:
    pairs = [(r[a], r[b]) for r in records if a in r and b in r]
    return bool(pairs) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in pairs)


def plot_pseudo_label_curves(records: list[dict], out: Path) -> Path:
    """The share of unlabeled pixels used and, under oracle_eval, pseudo-label accuracy over
    training; DAW's t* on its own panel (its early, ill-conditioned values can lie far outside
    [1/C, 1]: they are drawn at the panel's edge and counted in the title)."""
    train = [r for r in records if r["split"] == "train"]
    series = {
        "share of pixels used": "mask_ratio",
        "accuracy of used pseudo labels": "oracle/acc_used",
        "accuracy of discarded pseudo labels": "oracle/acc_discarded",
        "weight-averaged accuracy": "oracle/acc_weighted",
    }
    present = {label: key for label, key in series.items() if any(key in r for r in train)}
    used, weighted = "accuracy of used pseudo labels", "weight-averaged accuracy"
    if (
        used in present
        and weighted in present
        and _same_series(train, present[used], present[weighted])
    ):
        # 0/1 weights (a threshold, DAW's step function): one curve, or one would hide the other.
        del present[weighted]
        present[used + " (= weight-averaged)"] = present.pop(used)
    if not present:
        raise ValueError("no pseudo-label diagnostics in this run's metrics (a supervised run?)")
    thresholds = [(r["iteration"], r["policy/t"]) for r in train if "policy/t" in r]
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, 2 if thresholds else 1, figsize=(11 if thresholds else 6, 3.6), squeeze=False
    )
    ax = axes[0][0]
    for i, (label, key) in enumerate(present.items()):
        _styled_plot(ax, [(r["iteration"], r[key]) for r in train if key in r], label, i)
    ax.set_xlabel("iteration")
    ax.set_ylabel("share / accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("pseudo labels of the unlabeled batches")
    ax.legend(fontsize=7)
    if thresholds:
        right = axes[0][1]
        outside = sum(not 0 <= t <= 1 for _, t in thresholds)
        shown = [(i, min(max(t, 0.0), 1.0)) for i, t in thresholds]
        right.plot(*zip(*shown, strict=True), color="black")
        clipped = [
            (i, v) for (i, t), (_, v) in zip(thresholds, shown, strict=True) if not 0 <= t <= 1
        ]
        if clipped:
            right.scatter(
                *zip(*clipped, strict=True),
                color="#e76f51",
                marker="^",
                zorder=3,
                label="outside [0, 1], drawn at the edge",
            )
            right.legend(fontsize=7)
        right.set_ylim(0, 1.02)
        right.set_xlabel("iteration")
        right.set_ylabel("confidence threshold t*")
        right.set_title(
            "DAW's t*" + (f" ({outside} logged values outside [0, 1])" if outside else "")
        )
    return _save(fig, out / "pseudo_labels.png")


def plot_val_comparison(runs: dict[str, list[dict]], out: Path) -> Path:
    """Val mIoU of several runs over training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, records) in enumerate(runs.items()):
        points = [
            (r["iteration"], 100 * r["miou"])
            for r in records
            if r["split"] == "val" and "miou" in r
        ]
        if not points:
            raise ValueError(f"{name}: no evaluation in its metrics yet")
        _styled_plot(ax, points, name, i)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("validation mIoU")
    ax.legend(fontsize=8)
    return _save(fig, out / "val_miou_comparison.png")


def plot_accuracy_comparison(runs: dict[str, list[dict]], out: Path) -> Path:
    """Weight-averaged pseudo-label accuracy (`oracle/acc_weighted`) of several runs over
    training, e.g. rank weighting against its threshold-only baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, records in runs.items():
        points = [
            (r["iteration"], r["oracle/acc_weighted"])
            for r in records
            if r["split"] == "train" and "oracle/acc_weighted" in r
        ]
        if not points:
            raise ValueError(
                f"{name}: no oracle/acc_weighted in its metrics (train it with scheme.oracle_eval=true)"
            )
        ax.plot(*zip(*points, strict=True), label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("weight-averaged pseudo-label accuracy")
    ax.legend(fontsize=8)
    return _save(fig, out / "pseudo_label_accuracy.png")


STPG_SHARES = {
    "consistent": "stpg/share_consistent",
    "highly mismatched": "stpg/share_high_mismatch",
    "lowly mismatched": "stpg/share_low_mismatch",
}


def plot_stpg_mismatch(records: list[dict], class_names: Sequence[str], out: Path) -> Path:
    """STPG's pixel selection over training: the class mismatch score I_q of every class
    (Eq. 5) and the shares of consistent, highly and lowly mismatched pixels (Eq. 6)."""
    train = [
        r for r in records if r["split"] == "train" and all(k in r for k in STPG_SHARES.values())
    ]
    if not train:
        raise ValueError(
            "no STPG selection statistics (stpg/share_consistent, ...) in this run's metrics"
        )
    steps = [r["iteration"] for r in train]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for c, name in enumerate(class_names):
        key = f"stpg/mismatch/{c}"
        points = [(r["iteration"], r[key]) for r in train if key in r]
        if points:
            # tab10 repeats from the 11th class on (CamVid has 11): 20 colours, then dashes for VOC's 21
            style = "-" if c < 20 else "--"
            left.plot(
                *zip(*points, strict=True),
                label=name,
                linewidth=1,
                color=plt.cm.tab20(c % 20),
                linestyle=style,
            )
    left.set_xlabel("iteration")
    left.set_ylabel("class mismatch score I (Eq. 5)")
    left.set_ylim(0, 2)
    left.legend(fontsize=6, ncol=2)
    right.stackplot(
        steps, *[[r[k] for r in train] for k in STPG_SHARES.values()], labels=list(STPG_SHARES)
    )
    right.set_xlabel("iteration")
    right.set_ylabel("share of unlabeled pixels")
    right.set_ylim(0, 1)
    right.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "stpg_mismatch.png")


K_KEYS = ("fpl/k1", "fpl/k2", "fpl/k3", "fpl/k4+")


def plot_fpl_k_histogram(records: list[dict], out: Path) -> Path:
    """Share of unlabeled pixels with K = 1, 2, 3, >= 4 over training (FPL Fig. 4a), stacked."""
    train = [r for r in records if r["split"] == "train" and all(k in r for k in K_KEYS)]
    if not train:
        raise ValueError(
            "no FPL K statistics (fpl/k1, ...) in this run's metrics: was it trained with loss.name=fpl?"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["iteration"] for r in train]
    ax.stackplot(
        steps, *[[r[k] for r in train] for k in K_KEYS], labels=["K=1", "K=2", "K=3", "K>=4"]
    )
    ax.set_xlabel("iteration")
    ax.set_ylabel("share of unlabeled pixels")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "fpl_k_histogram.png")


def plot_fpl_gradient_scores(records: list[dict], out: Path) -> Path:
    """Mean positive gradient score R of FPL and of cross-entropy per case (FPL Fig. 3b),
    averaged over the logged training steps."""
    train = [r for r in records if r["split"] == "train"]
    means = {}
    for name in ("R", "R_ce"):
        for case in (1, 2, 3):
            values = [
                r[f"fpl/{name}_case{case}"]
                for r in train
                if np.isfinite(r.get(f"fpl/{name}_case{case}", np.nan))
            ]
            means[name, case] = float(np.mean(values)) if values else np.nan
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    cases = np.arange(1, 4)
    ax.bar(
        cases - 0.18,
        [means["R_ce", c] for c in cases],
        width=0.36,
        label="cross-entropy (R^v)",
        color="#8d99ae",
    )
    ax.bar(
        cases + 0.18, [means["R", c] for c in cases], width=0.36, label="FPL (R^f)", color="#e76f51"
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(cases, ["1: PL right", "2: truth in set", "3: truth outside"])
    ax.set_ylabel("mean positive gradient score R")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=8)
    return _save(fig, out / "fpl_gradient_scores.png")


def plot_fpl_k_maps(snapshots: list[dict], out: Path, columns: int = 4) -> Path:
    """K-value maps of a few unlabeled images at evaluations across training (FPL Fig. 5):
    one row per image, the image first, then its K map at up to `columns` iterations."""
    if not snapshots:
        raise ValueError("no FPL K-map snapshots in this run (RUN/fpl_kmaps is empty)")
    picks = np.linspace(0, len(snapshots) - 1, num=min(columns, len(snapshots))).round().astype(int)
    chosen = [snapshots[i] for i in sorted(set(picks))]
    rows = chosen[0]["images"].shape[0]
    plt = _pyplot()
    fig, axes = plt.subplots(
        rows, len(chosen) + 1, figsize=(2.6 * (len(chosen) + 1), 2.1 * rows), squeeze=False
    )
    cmap = plt.get_cmap("viridis", 4)
    for row in range(rows):
        axes[row, 0].imshow(chosen[0]["images"][row])
        for col, snap in enumerate(chosen, start=1):
            shown = axes[row, col].imshow(
                np.minimum(snap["k"][row], 4), cmap=cmap, vmin=0.5, vmax=4.5
            )
            if row == 0:
                axes[row, col].set_title(f"K, iteration {snap['iteration']}", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    colorbar = fig.colorbar(shown, ax=axes, ticks=[1, 2, 3, 4], fraction=0.02)
    colorbar.ax.set_yticklabels(["1", "2", "3", ">=4"])
    return _save(fig, out / "fpl_k_maps.png", tight=False)


def plot_run(
    run: Path,
    num_classes: int,
    iterations: Sequence[int] | None = None,
    compare: Sequence[Path] = (),
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write every figure this run's metrics support; returns their paths. `compare`: other
    run folders whose pseudo-label accuracy is drawn next to this run's."""
    folder = RunFolder(run)
    records = read_metrics(folder.metrics)
    out = folder.plots
    paths = [plot_training_curves(records, out, "/".join(run.parts[-2:]))]
    if any("mask_ratio" in r for r in records):
        paths.append(plot_pseudo_label_curves(records, out))
    if compare:
        # Bench runs live in METHOD/seedN: the last two parts tell them apart.
        runs = {"/".join(run.parts[-2:]): records}
        for other in compare:
            runs["/".join(other.parts[-2:])] = read_metrics(RunFolder(other).metrics)
        paths.append(plot_val_comparison(runs, out))
        if all(any("oracle/acc_weighted" in r for r in rs) for rs in runs.values()):
            paths.append(plot_accuracy_comparison(runs, out))
    if any("policy/mu_pos" in r for r in records):
        paths.append(plot_daw_fits(records, num_classes, out, iterations))
    if any("fpl/k1" in r for r in records):
        paths.append(plot_fpl_k_histogram(records, out))
    if any("stpg/share_consistent" in r for r in records):
        names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
        paths.append(plot_stpg_mismatch(records, names, out))
    if any("fpl/R_case1" in r for r in records):
        paths.append(plot_fpl_gradient_scores(records, out))
    snapshots = read_snapshots(folder.snapshots(FuzzyPositiveLoss.snapshot_dir))
    if snapshots:
        paths.append(plot_fpl_k_maps(snapshots, out))
    return paths
