"""Evaluation: `facegender evaluate`, and the numbers and figures of a labelled image set.

Everything here reads a `predictions.Predictions` record (`predictions.predict_labelled` makes it), so
`evaluate`, `report` and the end of `train` compute the same numbers the same way:

* `compute_metrics`: accuracy (with 95% Wilson interval), per-class precision/recall/F1, confusion
  matrix, loss, and expected calibration error before and after the temperature;
* the predicted class of an image is the model's one decision (`core.decision.decide` at the threshold
  of the `Predictions` record, `core.model.Model.decide`): accuracy, recall, confusion matrix, per-group
  metrics, coverage, mistakes and predictions.csv all read it; loss and ECE read the probabilities;
* `analyse`: those plus reliability bins (15 equal-width bins) before and after the temperature,
  test-time augmentation reported beside the plain model, per-group accuracy and per-class recall
  with intervals from a groups.csv (`facegender import` writes one: `path,label,<group columns>`,
  path relative to the dataset), and selective prediction (coverage and accuracy at a minimum
  confidence, and the whole curve);
* `write_figures`, `predictions_csv`, `mistakes`, `describe`: the files and lines of an analysis.

Images are prepared exactly as in training: the preprocessing recorded in the model file is
rebuilt (`core.preprocessing.Preprocessing.from_dict`), including face alignment when it was used.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facegender.core import files
from facegender.core.decision import apply_temperature, decide
from facegender.core.errors import ConfigError, InputFileError, InputNotFoundError
from facegender.core.model import DEFAULT_PRECISION, load
from facegender.evaluation.metrics import (
    classification_summary,
    coverage_curve,
    default_thresholds,
    expected_calibration_error,
    nll,
    per_group_metrics,
    reliability_bins,
    selective_metrics,
)
from facegender.evaluation.plots import plot_confusion_matrix, plot_coverage, plot_group_accuracy, plot_reliability
from facegender.evaluation.predictions import Predictions, predict_labelled

N_BINS = 15
GROUPS_FILE = "groups.csv"


def compute_metrics(
    logits, labels, classes: list[str], temperature: float = 1.0, threshold: float | None = None
) -> dict[str, Any]:
    """Accuracy (with 95% Wilson interval), per-class precision/recall/F1, confusion matrix, loss,
    and expected calibration error before and after temperature scaling (logits and labels:
    numpy arrays or torch tensors). Classes are predicted by `core.decision.decide` on the calibrated
    probabilities at `threshold` (None: the arg-max); `threshold` is recorded as used."""
    logits_np = np.asarray(logits.numpy() if hasattr(logits, "numpy") else logits, dtype=np.float64)
    labels_np = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels)
    probs = apply_temperature(logits_np, 1.0)
    calibrated = apply_temperature(logits_np, temperature)
    preds = decide(calibrated, threshold)
    summary = classification_summary(labels_np, preds, classes)
    summary.update(
        loss=nll(probs, labels_np),
        loss_calibrated=nll(calibrated, labels_np),
        ece=expected_calibration_error(probs, labels_np),
        ece_calibrated=expected_calibration_error(calibrated, labels_np),
        temperature=float(temperature),
        threshold=None if threshold is None or calibrated.shape[1] != 2 else float(threshold),
    )
    return summary


def write_evaluation(
    report: dict, metrics: dict | None, classes: list[str], out: Path, title: str = "Test set"
) -> None:
    """metrics.json (the whole report) and confusion_matrix.png (of `metrics`) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(json.dumps(report, indent=2, ensure_ascii=False), out / files.METRICS_JSON)
    if metrics is not None:
        plot_confusion_matrix(
            metrics["confusion_matrix"],
            classes,
            out / "confusion_matrix.png",
            f"{title}: accuracy {metrics['accuracy']:.3f} (n={metrics['n']})",
        )


# ----------------------------------------------------------------------------- groups


def read_groups(
    csv_path: str | os.PathLike, paths: Sequence[str | os.PathLike], data_dir: str | os.PathLike
) -> tuple[dict[str, list[str | None]], int]:
    """Group values of each image in `paths`, from a CSV with a `path` column and group columns.

    A row's path may be relative to the evaluated folder (`female/x.jpg`), to its parent, the
    dataset root (`test/female/x.jpg`, as `facegender import` writes it), to the CSV's own folder,
    or absolute. The `label` column, if any, is not a group. Images without a row get None (shown
    as group "unknown"). Returns ({column: values in `paths` order}, number of images matched)."""
    csv_path, data_dir = Path(csv_path), Path(data_dir)
    if not csv_path.is_file():
        raise InputNotFoundError(
            f"{csv_path}: groups file not found; pass a CSV with a path column and group "
            "columns (facegender import writes DATASET/groups.csv)"
        )
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if "path" not in fields:
        raise InputFileError(
            f"{csv_path}: no 'path' column (found {fields or 'no header'}); the first row must "
            "name the columns, e.g. path,label,age_band"
        )
    columns = [c for c in fields if c not in ("path", "label") and c]
    if not columns:
        raise InputFileError(f"{csv_path}: no group columns besides path/label; add columns such as age_band or source")

    def key(p) -> str:
        return os.path.normcase(os.path.abspath(p))

    index: dict[str, dict] = {}
    for row in rows:
        rel = (row.get("path") or "").strip().replace("\\", "/")
        if rel:
            for base in (data_dir, data_dir.parent, csv_path.parent):
                index.setdefault(key(base / rel), row)
    values: dict[str, list[str | None]] = {c: [] for c in columns}
    matched = 0
    for p in paths:
        row = index.get(key(p))
        matched += row is not None
        for c in columns:
            values[c].append(None if row is None else row.get(c))
    if paths and not matched:
        example = Path(paths[0])
        example = example.relative_to(data_dir).as_posix() if example.is_relative_to(data_dir) else example
        raise InputFileError(
            f"{csv_path}: none of its {len(rows)} paths names an image in {data_dir} (e.g. "
            f"{example}); write paths relative to {data_dir} or to {data_dir.parent}"
        )
    return values, matched


# ----------------------------------------------------------------------------- analysis


def analyse(
    pred: Predictions,
    groups: Mapping[str, Sequence] | None = None,
    min_confidence: float | None = None,
    min_group_size: int = 30,
) -> dict[str, Any]:
    """All evaluation numbers of `pred` as plain data (JSON-safe).

    The metrics of `evaluate.compute_metrics` (TTA logits when TTA is on), plus `reliability`
    (`before`/`after` temperature, 15 bins), `without_tta` (the same metrics without TTA, only when
    TTA is on), `coverage_curve` and, when asked, `selective` (at `min_confidence`) and `groups`
    (`metrics.per_group_metrics`, groups under `min_group_size` images flagged `too_few`).
    Confidence thresholds apply to the calibrated probability of the predicted class, as in
    `facegender predict`; classes are predicted at `pred.threshold` (recorded as `threshold`)."""
    metrics = compute_metrics(pred.logits, pred.labels, pred.classes, pred.temperature, pred.threshold)
    metrics["tta"] = pred.tta
    metrics["n_bins"] = N_BINS
    metrics["reliability"] = {
        "before": reliability_bins(pred.probs(False), pred.labels, N_BINS),
        "after": reliability_bins(pred.probs(True), pred.labels, N_BINS),
    }
    if pred.logits_plain is not None:
        metrics["without_tta"] = compute_metrics(
            pred.logits_plain, pred.labels, pred.classes, pred.temperature, pred.threshold
        )
    probs, preds = pred.probs(True), pred.predicted()
    thresholds = None
    if min_confidence is not None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ConfigError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
        thresholds = sorted(set(default_thresholds()) | {float(min_confidence)})
        metrics["selective"] = {
            "min_confidence": float(min_confidence),
            **selective_metrics(probs, pred.labels, min_confidence, preds),
        }
    metrics["coverage_curve"] = coverage_curve(probs, pred.labels, thresholds, preds)
    if groups:
        metrics["groups"] = per_group_metrics(pred.labels, preds, groups, pred.classes, min_group_size)
    return metrics


def mistakes(pred: Predictions, limit: int = 12) -> list[dict]:
    """The `limit` wrong predictions with the highest (calibrated) probability, most confident first."""
    probs, guess = pred.probs(True), pred.predicted()
    wrong = np.flatnonzero(guess != pred.labels)
    order = wrong[np.argsort(-probs[wrong, guess[wrong]], kind="stable")][:limit]
    return [
        {
            "path": str(pred.paths[i]),
            "true": pred.classes[pred.labels[i]],
            "predicted": pred.classes[guess[i]],
            "probability": float(probs[i, guess[i]]),
        }
        for i in order
    ]


def predictions_csv(pred: Predictions) -> str:
    """One row per image: path, true class, predicted class and its calibrated probability, the
    calibrated probability of each class."""
    probs = pred.probs(True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "true", "predicted", "probability", *[f"p_{c}" for c in pred.classes]])
    for p, y, guess, row in zip(pred.paths, pred.labels, pred.predicted(), probs):
        writer.writerow([str(p), pred.classes[y], pred.classes[guess], f"{row[guess]:.6f}", *[f"{v:.6f}" for v in row]])
    return buf.getvalue()


def safe_name(text: str) -> str:
    """A file-name-safe version of a group column name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "group"


def write_figures(metrics: dict, folder: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """The PNG figures of an analysis in `folder`; returns {figure name: path}: confusion_matrix,
    reliability (before temperature), reliability_calibrated, coverage, groups_<column> (one per
    group column)."""
    folder = Path(folder)
    figs: dict[str, Path] = {}
    prefix = f"{title}: " if title else ""
    figs["confusion_matrix"] = plot_confusion_matrix(
        metrics["confusion_matrix"],
        metrics["class_names"],
        folder / "confusion_matrix.png",
        f"{prefix}accuracy {metrics['accuracy']:.3f} (n={metrics['n']})",
    )
    figs["reliability"] = plot_reliability(
        metrics["reliability"]["before"],
        folder / "reliability.png",
        f"Before temperature scaling: ECE {metrics['ece']:.3f}",
    )
    figs["reliability_calibrated"] = plot_reliability(
        metrics["reliability"]["after"],
        folder / "reliability_calibrated.png",
        f"After temperature {metrics['temperature']:.2f}: ECE {metrics['ece_calibrated']:.3f}",
    )
    figs["coverage"] = plot_coverage(metrics["coverage_curve"], folder / "coverage.png")
    for column, col_metrics in (metrics.get("groups") or {}).items():
        figs[f"groups_{column}"] = plot_group_accuracy(
            col_metrics, folder / f"groups_{safe_name(column)}.png", f"Accuracy by {column}"
        )
    return figs


def describe(metrics: dict) -> list[str]:
    """Terminal lines for what `analyse` adds to the plain accuracy line."""
    lines = []
    if "without_tta" in metrics:
        w = metrics["without_tta"]
        lines.append(
            f"  with flip TTA: accuracy {metrics['accuracy']:.4f}, ECE {metrics['ece_calibrated']:.4f}; "
            f"without TTA: accuracy {w['accuracy']:.4f}, ECE {w['ece_calibrated']:.4f} (calibrated)"
        )
    if "selective" in metrics:
        s = metrics["selective"]
        acc = "-" if s["accuracy_on_covered"] is None else f"{s['accuracy_on_covered']:.4f}"
        lines.append(
            f"  min confidence {s['min_confidence']:g}: coverage {s['coverage']:.3f} "
            f"({s['n_covered']} of {s['n']} answered), accuracy on answered {acc}"
        )
    for column, g in (metrics.get("groups") or {}).items():
        few = [k for k, v in g["groups"].items() if v["too_few"]]
        parts = [f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in g["groups"].items()]
        lines.append(f"  by {column}: " + ", ".join(parts))
        if g["worst_group"] is not None:
            lines.append(
                f"    worst {g['worst_group']} {g['worst_accuracy']:.3f}, gap {g['accuracy_gap']:.3f}"
                + (f"; too few images (<{g['min_count']}): {', '.join(few)}" if few else "")
                + (" (every group is small: unreliable)" if g["compared_all_groups"] else "")
            )
    return lines


# ----------------------------------------------------------------------------- the command


def source_name(folder: Path) -> str:
    """A folder's name in per-source results: DATASET for DATASET/test, else the folder's own."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name in ("test", "train", "val") else folder.name


def evaluate_model(
    model_path: str,
    data_dir: str | Sequence[str],
    out: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    tta: bool | None = None,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    groups: str | None = None,
    min_confidence: float | None = None,
    min_group_size: int = 30,
    precision: str = DEFAULT_PRECISION,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Metrics of the model at `model_path` on `data_dir`/<class>/* (class names must be the model's);
    several folders are evaluated together, with each one's accuracy and recall under
    `groups.source` (a group column, like those of a groups CSV).

    Classes are decided at `threshold` on the probability of the model's second class (None: the
    model's stored threshold, or the arg-max without one; 0.5: the arg-max); metrics.json records it.
    `tta` None uses what the model was trained with; with TTA on, the metrics without it are reported
    too (`without_tta`). Adds reliability bins, the coverage curve and, when given, accuracy at
    `min_confidence` and per-group metrics from the `groups` CSV (see `analyse`). Writes
    metrics.json, predictions.csv and the figures (confusion matrix, reliability before/after
    temperature, coverage, one chart per group column) into `out` when given."""
    overrides = {k: v for k, v in (("tta", tta), ("threshold", threshold)) if v is not None}
    model = load(model_path, device=device, precision=precision, detect=False, **overrides)
    folders = [Path(d) for d in ([data_dir] if isinstance(data_dir, (str, os.PathLike)) else data_dir)]
    classes, data_dir = model.classes, folders[0]
    parts = [predict_labelled(model, d, skip_bad, batch_size, log=log, progress=progress) for d in folders]
    pred = Predictions.concat(parts)
    group_values, matched = read_groups(groups, pred.paths, data_dir) if groups else ({}, 0)
    if len(folders) > 1:
        group_values["source"] = [source_name(d) for d, p in zip(folders, parts) for _ in p.paths]
    metrics = analyse(pred, group_values or None, min_confidence, min_group_size)
    metrics.update(model=str(model_path), data=", ".join(map(str, folders)), skipped_files=pred.skipped)
    if groups:
        metrics.update(groups_file=str(groups), groups_matched=matched)
        if matched < len(pred.paths):
            log(f"note: {len(pred.paths) - matched} image(s) have no row in {groups}; their group is 'unknown'")
    if out:
        write_evaluation(metrics, None, classes, Path(out))
        write_figures(metrics, out, title=data_dir.name)
        files.write_text_atomic(predictions_csv(pred), Path(out) / "predictions.csv")
    for line in (headline(metrics, classes), *describe(metrics)):
        log(line)
    return metrics


def headline(metrics: dict[str, Any], classes: list[str]) -> str:
    """evaluate's first line: accuracy with its interval, each class's recall, ECE, the threshold."""
    return (
        f"{metrics['data']}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}, 95% CI "
        f"{metrics['accuracy_ci'][0]:.3f}-{metrics['accuracy_ci'][1]:.3f}); "
        + ", ".join(f"recall {c} {v['recall']:.3f}" for c, v in metrics["per_class"].items())
        + f"; ECE {metrics['ece']:.4f} -> {metrics['ece_calibrated']:.4f} calibrated"
        + ("" if metrics["threshold"] is None else f"; {classes[1]} at p >= {metrics['threshold']:.4g}")
    )
