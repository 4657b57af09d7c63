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


def evaluate_model(model_path: str, data_dir: str, out: str | None = None, batch_size: int = 64,
                   device: str = "auto", tta: bool | None = None, skip_bad: bool = False,
                   log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Metrics of the model at `model_path` on `data_dir`/<class>/* (class names must be the model's).

    `tta` None uses what the model was trained with. Writes metrics.json and confusion_matrix.png
    into `out` when given."""
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
    dev = select_device(device)
    precision = select_precision("auto", dev)
    model.to(dev)
    tta = record.get("tta", False) if tta is None else tta
    result = evaluate(model, make_loader(FaceDataset(loaded, EvalPreset(prep)), batch_size, False),
                      nn.CrossEntropyLoss(), dev, precision, tta=tta, progress=progress)
    metrics = compute_metrics(result["logits"], result["labels"], classes, record.get("temperature", 1.0))
    metrics.update(model=str(model_path), data=str(data_dir), tta=tta, skipped_files=loaded.bad)
    if out:
        write_evaluation(metrics, metrics, classes, Path(out), title=data_dir.name)
    log(f"{data_dir}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}, 95% CI "
        f"{metrics['accuracy_ci'][0]:.3f}-{metrics['accuracy_ci'][1]:.3f}); "
        + ", ".join(f"recall {c} {v['recall']:.3f}" for c, v in metrics["per_class"].items())
        + f"; ECE {metrics['ece']:.4f} -> {metrics['ece_calibrated']:.4f} calibrated")
    return metrics
