"""`facegender evaluate`: a trained model on a folder of labelled images (DATASET/test/<class>/*).

The images are prepared exactly as in training: the preprocessing recorded in the model file is
rebuilt here (`transforms.Preprocessing.from_dict`), including face alignment when it was used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from facegender import checkpoint as ckpt
from facegender.data import (DatasetError, FaceDataset, ImageLoader, find_classes, load_split, make_loader,
                             scan_split)
from facegender.engine import evaluate, select_device, select_precision
from facegender.metrics import apply_temperature, classification_summary, expected_calibration_error, nll
from facegender.plots import plot_confusion_matrix
from facegender.transforms import EvalPreset, ImagePreparer, Preprocessing


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                    temperature: float = 1.0) -> dict[str, Any]:
    """Accuracy (with 95% Wilson interval), per-class precision/recall/F1, confusion matrix, loss,
    and expected calibration error before and after temperature scaling."""
    logits_np, labels_np = logits.numpy().astype(np.float64), labels.numpy()
    probs = apply_temperature(logits_np, 1.0)
    calibrated = apply_temperature(logits_np, temperature)
    preds = probs.argmax(1)
    summary = classification_summary(labels_np, preds, classes)
    summary.update(
        loss=nll(probs, labels_np),
        loss_calibrated=nll(calibrated, labels_np),
        ece=expected_calibration_error(probs, labels_np),
        ece_calibrated=expected_calibration_error(calibrated, labels_np),
        temperature=float(temperature),
    )
    return summary


def write_evaluation(report: dict, metrics: dict | None, classes: list[str], out: Path,
                     title: str = "Test set") -> None:
    """metrics.json (the whole report) and confusion_matrix.png (of `metrics`) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(json.dumps(report, indent=2, ensure_ascii=False), out / "metrics.json")
    if metrics is not None:
        plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png",
                              f"{title}: accuracy {metrics['accuracy']:.3f} (n={metrics['n']})")


def load_labelled(model_path: str, data_dir: str, skip_bad: bool = False, log: Callable[[str], None] = print,
                  progress: bool = True):
    """(model, record, loaded images, preprocessing, image loader) for evaluating the model at
    `model_path` on `data_dir`/<class>/* (class folders must be classes of the model)."""
    model, record = ckpt.load_model(model_path)
    classes = record["classes"]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: folder not found; pass a folder with one subfolder per class")
    folders = find_classes(data_dir)
    unknown = sorted(set(folders) - set(classes))
    if unknown or not folders:
        raise DatasetError(f"{data_dir}: class folders {unknown or folders or 'none'} are not classes of this "
                           f"model ({classes}); pass a folder like DATASET/test with subfolders {classes}")
    present = [c for c in classes if c in folders]
    split, problems = scan_split(data_dir, present)
    split.labels = [classes.index(present[i]) for i in split.labels]  # the model's class indices
    if problems and not skip_bad:
        raise DatasetError("\n".join(problems))
    prep = Preprocessing.from_dict(record["preprocessing"])
    from facegender.prepare import loader_preprocessing

    loader = ImageLoader(ImagePreparer(loader_preprocessing(prep, data_dir, log)))  # no 2nd alignment
    loaded = load_split(split, loader, skip_bad=skip_bad, desc="reading images", progress=progress)
    return model, record, loaded, prep, loader


def evaluate_model(model_path: str, data_dir: str, out: str | None = None, batch_size: int = 64,
                   device: str = "auto", tta: bool | None = None, skip_bad: bool = False,
                   log: Callable[[str], None] = print, progress: bool = True, groups: str | None = None,
                   min_confidence: float | None = None, min_group_size: int = 30) -> dict[str, Any]:
    """Metrics of the model at `model_path` on `data_dir`/<class>/* (class names must be the model's).

    `tta` None uses what the model was trained with; with TTA on, the metrics without it are reported
    too (`without_tta`). Adds reliability bins, the coverage curve and, when given, accuracy at
    `min_confidence` and per-group metrics from the `groups` CSV (see `report.analyse`). Writes
    metrics.json, predictions.csv and the figures (confusion matrix, reliability before/after
    temperature, coverage, one chart per group column) into `out` when given."""
    from facegender.report import analyse, describe, predictions_csv, predict_loaded, read_groups, write_figures

    model, record, loaded, prep, loader = load_labelled(model_path, data_dir, skip_bad, log, progress)
    classes, data_dir = record["classes"], Path(data_dir)
    dev = select_device(device)
    precision = select_precision("auto", dev)
    model.to(dev)
    tta = record.get("tta", False) if tta is None else tta
    group_values, matched = read_groups(groups, loaded.split.paths, data_dir) if groups else (None, 0)
    pred = predict_loaded(model, loaded, prep, classes, record.get("temperature", 1.0), tta, dev, precision,
                          batch_size, loader=loader, progress=progress)
    metrics = analyse(pred, group_values, min_confidence, min_group_size)
    metrics.update(model=str(model_path), data=str(data_dir), skipped_files=loaded.bad)
    if groups:
        metrics.update(groups_file=str(groups), groups_matched=matched)
        if matched < len(pred.paths):
            log(f"note: {len(pred.paths) - matched} image(s) have no row in {groups}; their group is 'unknown'")
    if out:
        write_evaluation(metrics, None, classes, Path(out))
        write_figures(metrics, out, title=data_dir.name)
        ckpt.write_text_atomic(predictions_csv(pred), Path(out) / "predictions.csv")
    log(f"{data_dir}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}, 95% CI "
        f"{metrics['accuracy_ci'][0]:.3f}-{metrics['accuracy_ci'][1]:.3f}); "
        + ", ".join(f"recall {c} {v['recall']:.3f}" for c, v in metrics["per_class"].items())
        + f"; ECE {metrics['ece']:.4f} -> {metrics['ece_calibrated']:.4f} calibrated")
    for line in describe(metrics):
        log(line)
    return metrics
