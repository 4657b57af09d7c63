"""Figures: training curves, confusion matrix, and the evaluation report's calibration, per-group
and coverage charts (drawn from the outputs of :mod:`facegender.evaluation.metrics`).

Each function takes the plain dicts/lists that ``metrics`` returns, draws on its own
``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global backend change, safe in
threads and servers), writes the PNG to a temporary file in the destination folder and moves it
into place with ``os.replace``, so a reader never sees a half-written image. Each returns the path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from facegender.core.files import atomic_path

__all__ = ["plot_curves", "plot_confusion_matrix", "plot_reliability", "plot_group_accuracy", "plot_coverage"]

_DPI = 100


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return Path(path)


def plot_curves(
    history: Sequence[Mapping[str, Any]],
    key: str,
    path: str | os.PathLike,
    title: str,
    best_epoch: int | None = None,
    val_name: str = "validation",
) -> Path:
    """Train vs validation `key` ('loss' or 'acc') per epoch, from the training history rows."""
    fig = _new_figure(6.4, 4.2)
    ax = fig.subplots()
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label="train")
    ax.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", label=val_name)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Counts with row-normalised shading (rows: true class, columns: predicted class)."""
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = _new_figure(5.2, 4.6)
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    return _save(fig, path)


def plot_reliability(
    bins: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "Reliability diagram"
) -> Path:
    """Reliability diagram from :func:`facegender.evaluation.metrics.reliability_bins`.

    Bars show the accuracy of each confidence bin (empty bins left blank), with a marker at the
    bin's mean confidence and the diagonal of perfect calibration; a lower panel shows how many
    images fall in each bin. Square figure (6 x 6 in, 600 x 600 px).
    """
    fig = _new_figure(6, 6)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    lowers = [b["lower"] for b in bins]
    widths = [b["upper"] - b["lower"] for b in bins]
    filled = [b for b in bins if b["count"]]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(
        [b["lower"] for b in filled],
        [b["accuracy"] for b in filled],
        width=[b["upper"] - b["lower"] for b in filled],
        align="edge",
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="accuracy",
    )
    ax.plot(
        [(b["lower"] + b["upper"]) / 2 for b in filled],
        [b["confidence"] for b in filled],
        "o",
        color="tab:red",
        label="mean confidence",
    )
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize="small")
    ax_n.bar(lowers, [b["count"] for b in bins], width=widths, align="edge", color="grey", edgecolor="black")
    ax_n.set(xlabel="confidence (top probability)", ylabel="images")
    return _save(fig, path)


def plot_group_accuracy(
    column_metrics: Mapping[str, Any], path: str | os.PathLike, title: str = "Accuracy by group"
) -> Path:
    """Accuracy per group with Wilson 95% error bars, from one column of
    :func:`facegender.evaluation.metrics.per_group_metrics` (``result[column]``).

    Each group is labelled with its count; groups with too few images are drawn hatched and pale
    and labelled "too few", so a reader sees them but does not over-read them. The worst group and
    the accuracy gap are given under the title. The figure is 4 in high and grows with the
    number of groups (at least 6 in wide).
    """
    groups = column_metrics["groups"]
    names = list(groups)
    fig = _new_figure(max(6.0, 1.0 + 0.7 * len(names)), 4)
    ax = fig.subplots()
    acc = [groups[k]["accuracy"] or 0.0 for k in names]
    lo = [a - groups[k]["accuracy_ci"][0] for a, k in zip(acc, names)]
    hi = [groups[k]["accuracy_ci"][1] - a for a, k in zip(acc, names)]
    few = [bool(groups[k].get("too_few")) for k in names]
    x = range(len(names))
    bars = ax.bar(
        x, acc, yerr=[lo, hi], capsize=4, color=["lightgrey" if f else "tab:blue" for f in few], edgecolor="black"
    )
    for bar, f in zip(bars, few):
        if f:
            bar.set_hatch("//")
    ticks = [f"{k}\nn={groups[k]['n']}" + ("\n(too few)" if few[i] else "") for i, k in enumerate(names)]
    rotate = len(names) > 6
    ax.set_xticks(list(x), ticks, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    worst = column_metrics.get("worst_group")
    gap = column_metrics.get("accuracy_gap")
    if worst is not None and gap is not None:
        note = f"worst: {worst}, gap {gap:.1%}"
        if column_metrics.get("compared_all_groups"):
            note += " (all groups too small to compare reliably)"
        title = f"{title}\n{note}"
    ax.set(ylim=(0, 1.05), ylabel="accuracy (95% CI)", title=title)
    return _save(fig, path)


def plot_coverage(
    curve: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "Accuracy vs. coverage"
) -> Path:
    """Accuracy on the answered images and coverage against the confidence threshold, from
    :func:`facegender.evaluation.metrics.coverage_curve` (thresholds with nothing kept are not drawn for
    accuracy). Figure 6.4 x 4 in (640 x 400 px)."""
    fig = _new_figure(6.4, 4)
    ax = fig.subplots()
    covered = [p for p in curve if p["coverage"] is not None]
    ax.plot(
        [p["threshold"] for p in covered], [p["coverage"] for p in covered], "o-", color="tab:grey", label="coverage"
    )
    kept = [p for p in curve if p["accuracy"] is not None]
    ax.plot(
        [p["threshold"] for p in kept],
        [p["accuracy"] for p in kept],
        "o-",
        color="tab:blue",
        label="accuracy on answered images",
    )
    ax.set(xlabel="minimum confidence to answer", ylabel="fraction", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)
