"""Evaluation beyond accuracy, and `facegender report`: one self-contained HTML page per model.

What `evaluate` and `report` add to the plain metrics of `evaluate.compute_metrics`:

* calibration: reliability bins (15 equal-width bins) before and after the model's temperature;
* test-time augmentation reported beside the plain model (both are computed when TTA is on);
* per-group accuracy and per-class recall with Wilson 95% intervals, from a groups.csv
  (`facegender import` writes one: `path,label,<group columns>`, path relative to the dataset);
* selective prediction: coverage and accuracy at a minimum confidence, and the whole curve.

`build_report` writes ONE HTML file: every figure and thumbnail is embedded as a base64 data URI,
the CSS is inline, and a Content-Security-Policy forbids loading anything from elsewhere, so the
file can be mailed or archived as it is. Every string that comes from data (file names, class and
group names, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

N_BINS = 15
GROUPS_FILE = "groups.csv"


# ----------------------------------------------------------------------------- predictions

@dataclass
class Predictions:
    """Logits of a labelled image set, with what is needed to read them."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray               # (N,) class indices
    logits: np.ndarray               # (N, C) as evaluated: the mean with the mirror image when `tta`
    temperature: float = 1.0
    tta: bool = False
    logits_plain: np.ndarray | None = None  # (N, C) without test-time augmentation, when `tta`

    def probs(self, calibrated: bool = True) -> np.ndarray:
        from facegender.metrics import apply_temperature

        return apply_temperature(self.logits, self.temperature if calibrated else 1.0)


class _Mirrored:
    """A transform followed by a horizontal flip (the second view of flip TTA)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return torch.flip(self.transform(img), dims=[-1])


def predict_loaded(model, loaded, prep, classes: list[str], temperature: float = 1.0, tta: bool = False,
                   device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int = 64,
                   loader=None, channels_last: bool = False, progress: bool = True) -> Predictions:
    """Logits of `model` on a `data.LoadedSplit`. With `tta` the plain logits are kept too, so both
    can be reported (two passes: the images and their mirror images; their mean is flip TTA)."""
    from facegender.data import FaceDataset, make_loader
    from facegender.engine import predict_logits
    from facegender.transforms import EvalPreset

    device = torch.device(device)
    tf = EvalPreset(prep)

    def run(transform, desc):
        batches = make_loader(FaceDataset(loaded, transform, loader), batch_size, False)
        return predict_logits(model, batches, device, precision, channels_last, False, desc, progress)

    plain, labels = run(tf, "evaluate")
    logits, logits_plain = plain, None
    if tta:
        mirrored, _ = run(_Mirrored(tf), "evaluate (mirrored)")
        logits, logits_plain = (plain + mirrored) / 2, plain
    as_np = lambda t: None if t is None else t.numpy().astype(np.float64)  # noqa: E731
    return Predictions(list(classes), list(loaded.split.paths), labels.numpy(), as_np(logits),
                       float(temperature), bool(tta), as_np(logits_plain))


# ----------------------------------------------------------------------------- groups

def read_groups(csv_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                data_dir: str | os.PathLike) -> tuple[dict[str, list[str | None]], int]:
    """Group values of each image in `paths`, from a CSV with a `path` column and group columns.

    A row's path may be relative to the evaluated folder (`female/x.jpg`), to its parent, the
    dataset root (`test/female/x.jpg`, as `facegender import` writes it), to the CSV's own folder,
    or absolute. The `label` column, if any, is not a group. Images without a row get None (shown
    as group "unknown"). Returns ({column: values in `paths` order}, number of images matched)."""
    csv_path, data_dir = Path(csv_path), Path(data_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: groups file not found; pass a CSV with a path column and group "
                                "columns (facegender import writes DATASET/groups.csv)")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if "path" not in fields:
        raise ValueError(f"{csv_path}: no 'path' column (found {fields or 'no header'}); the first row must name "
                         "the columns, e.g. path,label,age_band")
    columns = [c for c in fields if c not in ("path", "label") and c]
    if not columns:
        raise ValueError(f"{csv_path}: no group columns besides path/label; add columns such as age_band or source")

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
        raise ValueError(f"{csv_path}: none of its {len(rows)} paths names an image in {data_dir} (e.g. "
                         f"{example.relative_to(data_dir).as_posix() if example.is_relative_to(data_dir) else example}"
                         f"); write paths relative to {data_dir} or to {data_dir.parent}")
    return values, matched


# ----------------------------------------------------------------------------- analysis

def analyse(pred: Predictions, groups: Mapping[str, Sequence] | None = None, min_confidence: float | None = None,
            min_group_size: int = 30) -> dict[str, Any]:
    """All evaluation numbers of `pred` as plain data (JSON-safe).

    The metrics of `evaluate.compute_metrics` (TTA logits when TTA is on), plus `reliability`
    (`before`/`after` temperature, 15 bins), `without_tta` (the same metrics without TTA, only when
    TTA is on), `coverage_curve` and, when asked, `selective` (at `min_confidence`) and `groups`
    (`metrics.per_group_metrics`, groups under `min_group_size` images flagged `too_few`).
    Confidence thresholds apply to calibrated probabilities, as in `facegender predict`."""
    from facegender.evaluate import compute_metrics
    from facegender.metrics import coverage_curve, per_group_metrics, reliability_bins, selective_metrics

    logits, labels = torch.from_numpy(pred.logits), torch.from_numpy(pred.labels)
    metrics = compute_metrics(logits, labels, pred.classes, pred.temperature)
    metrics["tta"] = pred.tta
    metrics["n_bins"] = N_BINS
    metrics["reliability"] = {"before": reliability_bins(pred.probs(False), pred.labels, N_BINS),
                              "after": reliability_bins(pred.probs(True), pred.labels, N_BINS)}
    if pred.logits_plain is not None:
        metrics["without_tta"] = compute_metrics(torch.from_numpy(pred.logits_plain), labels, pred.classes,
                                                 pred.temperature)
    probs = pred.probs(True)
    thresholds = None
    if min_confidence is not None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
        from facegender.metrics import _default_thresholds

        thresholds = sorted(set(_default_thresholds()) | {float(min_confidence)})
        metrics["selective"] = {"min_confidence": float(min_confidence),
                                **selective_metrics(probs, pred.labels, min_confidence)}
    metrics["coverage_curve"] = coverage_curve(probs, pred.labels, thresholds)
    if groups:
        metrics["groups"] = per_group_metrics(pred.labels, probs.argmax(1), groups, pred.classes, min_group_size)
    return metrics


def mistakes(pred: Predictions, limit: int = 12) -> list[dict]:
    """The `limit` wrong predictions with the highest (calibrated) probability, most confident first."""
    probs = pred.probs(True)
    guess = probs.argmax(1)
    wrong = np.flatnonzero(guess != pred.labels)
    order = wrong[np.argsort(-probs[wrong, guess[wrong]], kind="stable")][:limit]
    return [{"path": str(pred.paths[i]), "true": pred.classes[pred.labels[i]], "predicted": pred.classes[guess[i]],
             "probability": float(probs[i, guess[i]])} for i in order]


def predictions_csv(pred: Predictions) -> str:
    """One row per image: path, true class, predicted class, calibrated probability of each class."""
    probs = pred.probs(True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "true", "predicted", "probability", *[f"p_{c}" for c in pred.classes]])
    for p, y, row in zip(pred.paths, pred.labels, probs):
        writer.writerow([str(p), pred.classes[y], pred.classes[int(row.argmax())], f"{row.max():.6f}",
                         *[f"{v:.6f}" for v in row]])
    return buf.getvalue()


def safe_name(text: str) -> str:
    """A file-name-safe version of a group column name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "group"


def write_figures(metrics: dict, folder: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """The PNG figures of an analysis in `folder`; returns {figure name: path}: confusion_matrix,
    reliability (before temperature), reliability_calibrated, coverage, groups_<column> (one per
    group column)."""
    from facegender.plots import plot_confusion_matrix, plot_coverage, plot_group_accuracy, plot_reliability

    folder = Path(folder)
    figs: dict[str, Path] = {}
    prefix = f"{title}: " if title else ""
    figs["confusion_matrix"] = plot_confusion_matrix(
        metrics["confusion_matrix"], metrics["class_names"], folder / "confusion_matrix.png",
        f"{prefix}accuracy {metrics['accuracy']:.3f} (n={metrics['n']})")
    figs["reliability"] = plot_reliability(metrics["reliability"]["before"], folder / "reliability.png",
                                           f"Before temperature scaling: ECE {metrics['ece']:.3f}")
    figs["reliability_calibrated"] = plot_reliability(
        metrics["reliability"]["after"], folder / "reliability_calibrated.png",
        f"After temperature {metrics['temperature']:.2f}: ECE {metrics['ece_calibrated']:.3f}")
    figs["coverage"] = plot_coverage(metrics["coverage_curve"], folder / "coverage.png")
    for column, col_metrics in (metrics.get("groups") or {}).items():
        figs[f"groups_{column}"] = plot_group_accuracy(col_metrics, folder / f"groups_{safe_name(column)}.png",
                                                       f"Accuracy by {column}")
    return figs


def training_curves(model_path: str | os.PathLike, folder: str | os.PathLike,
                    best_epoch: int | None = None) -> dict[str, Path]:
    """loss_curve/accuracy_curve of the model's run: the PNGs `train` wrote next to the model, or
    drawn into `folder` from the run's history (`load_history`); {} when there is no history."""
    from facegender.plots import plot_curves

    run = Path(model_path).parent
    names = {"loss_curve": ("loss", "Loss per epoch"), "accuracy_curve": ("acc", "Accuracy per epoch")}
    if Path(model_path).name == "best_model.pth" and all((run / f"{n}.png").is_file() for n in names):
        return {n: run / f"{n}.png" for n in names}
    history = load_history(model_path)
    if not history:
        return {}
    return {n: plot_curves(history, key, Path(folder) / f"{n}.png", title, best_epoch)
            for n, (key, title) in names.items()}


def describe(metrics: dict) -> list[str]:
    """Terminal lines for what `analyse` adds to the plain accuracy line."""
    lines = []
    if "without_tta" in metrics:
        w = metrics["without_tta"]
        lines.append(f"  with flip TTA: accuracy {metrics['accuracy']:.4f}, ECE {metrics['ece_calibrated']:.4f}; "
                     f"without TTA: accuracy {w['accuracy']:.4f}, ECE {w['ece_calibrated']:.4f} (calibrated)")
    if "selective" in metrics:
        s = metrics["selective"]
        acc = "-" if s["accuracy_on_covered"] is None else f"{s['accuracy_on_covered']:.4f}"
        lines.append(f"  min confidence {s['min_confidence']:g}: coverage {s['coverage']:.3f} "
                     f"({s['n_covered']} of {s['n']} answered), accuracy on answered {acc}")
    for column, g in (metrics.get("groups") or {}).items():
        few = [k for k, v in g["groups"].items() if v["too_few"]]
        parts = [f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in g["groups"].items()]
        lines.append(f"  by {column}: " + ", ".join(parts))
        if g["worst_group"] is not None:
            lines.append(f"    worst {g['worst_group']} {g['worst_accuracy']:.3f}, gap {g['accuracy_gap']:.3f}"
                         + (f"; too few images (<{g['min_count']}): {', '.join(few)}" if few else "")
                         + (" (every group is small: unreliable)" if g["compared_all_groups"] else ""))
    return lines


# ----------------------------------------------------------------------------- training history

def load_history(model_path: str | os.PathLike) -> list[dict] | None:
    """Training history of the run a model file belongs to: summary.csv next to it, else the
    `history` of gender_checkpoint.pth there (or in the file itself); None when there is neither."""
    folder = Path(model_path).parent
    summary = folder / "summary.csv"
    if summary.is_file():
        with open(summary, newline="", encoding="utf-8") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        if rows and {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(rows[0]):
            return rows
    from facegender import checkpoint as ckpt

    for candidate in (folder / "gender_checkpoint.pth", Path(model_path)):
        if candidate.is_file():
            try:
                history = ckpt.load_file(candidate).get("history")
            except ckpt.CheckpointError:
                continue
            if history:
                return list(history)
    return None


def _number(text: str):
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return text


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
header{background:#23395b;color:#fff;padding:20px 24px}
header h1{margin:0 0 6px;font-size:1.6em} header p{margin:2px 0;opacity:.9}
nav{background:#fff;border-bottom:1px solid #dde;padding:8px 24px;position:sticky;top:0}
nav a{margin-right:14px;color:#23395b;text-decoration:none}
section{background:#fff;border:1px solid #dde;border-radius:8px;margin:18px 0;padding:14px 20px}
h2{margin-top:4px;color:#23395b} h3{margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:.92em}
th,td{border:1px solid #ccd;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.few td{color:#888;font-style:italic}
.figs{display:flex;flex-wrap:wrap;gap:14px}
.figs img{max-width:calc(50% - 10px);height:auto;border:1px solid #e3e3e3;box-sizing:border-box}
.figs img:only-child{max-width:100%}
.cols{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.note{color:#555;font-size:.92em}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure.mistake{margin:0;width:150px;font-size:.82em;border:1px solid #ddd;padding:6px;border-radius:6px;background:#fcfcfc}
figure.mistake img{width:128px;height:128px;object-fit:contain;display:block;margin:0 auto 4px;background:#eee}
figure.mistake figcaption{word-break:break-all}
.bad{color:#b3261e;font-weight:600}
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(path: Path, alt: str) -> str:
    return f'<img src="{_data_uri(Path(path).read_bytes(), "image/png")}" alt="{_e(alt)}">'


def thumbnail_uri(path: str | os.PathLike, size: int = 128) -> str | None:
    """A JPEG thumbnail of an image file as a data URI (None when the file cannot be read)."""
    from facegender.images import ImageError, load_image

    try:
        im = load_image(path)
    except (ImageError, OSError):
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """A table; `header` cells are escaped here, `rows` cells must already be HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _td(text: Any, num: bool = False) -> str:
    return f'<td class="num">{_e(text)}</td>' if num else f"<td>{_e(text)}</td>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def render_html(metrics: dict, record: dict, figures: Mapping[str, Path], gallery: list[dict],
                model_path: str, data_dir: str, groups_file: str | None = None, note: str | None = None) -> str:
    """The report page (a string); `figures` from `write_figures`, `gallery` from `mistakes`."""
    classes = metrics["class_names"]
    sections = []

    # summary
    rows = [[_td("images"), _td(metrics["n"], True)],
            [_td("accuracy (95% Wilson CI)"),
             _td(f"{_pct(metrics['accuracy'], 2)} ({_ci(metrics['accuracy_ci'])})", True)],
            [_td("balanced accuracy"), _td(_pct(metrics["balanced_accuracy"], 2), True)],
            [_td("macro F1"), _td(f"{metrics['macro_f1']:.4f}", True)],
            [_td(f"ECE ({metrics['n_bins']} bins) before → after temperature {metrics['temperature']:.3f}"),
             _td(f"{metrics['ece']:.4f} → {metrics['ece_calibrated']:.4f}", True)],
            [_td("test-time augmentation"), _td("horizontal flip" if metrics["tta"] else "none")]]
    if "without_tta" in metrics:
        w = metrics["without_tta"]
        rows.append([_td("without TTA: accuracy (95% CI), ECE after temperature"),
                     _td(f"{_pct(w['accuracy'], 2)} ({_ci(w['accuracy_ci'])}), {w['ece_calibrated']:.4f}", True)])
    if "selective" in metrics:
        s = metrics["selective"]
        rows.append([_td(f"at minimum confidence {s['min_confidence']:g}: coverage, accuracy on answered"),
                     _td(f"{_pct(s['coverage'])} ({s['n_covered']}/{s['n']}), {_pct(s['accuracy_on_covered'], 2)}",
                         True)])
    body = _table(["", "value"], rows)
    if note:
        body += f'<p class="note">{_e(note)}</p>'
    sections.append(_section("summary", "Summary", body))

    # config
    info = [("backbone", record.get("backbone")), ("classes", ", ".join(map(str, record.get("classes", [])))),
            ("pretrained", record.get("pretrained")), ("weights", record.get("weights_source")),
            ("best epoch", record.get("epoch")), ("temperature", record.get("temperature")),
            ("TTA in model file", record.get("tta"))]
    for split, m in (record.get("metrics") or {}).items():
        if isinstance(m, dict):
            info.append((f"recorded {split} metrics", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                 for k, v in m.items())))
    body = _table(["model", "value"], [[_td(k), _td(f"{v:.4g}" if isinstance(v, float) else v)] for k, v in info])
    config = list((record.get("config") or {}).items())
    if config:
        third = -(-len(config) // 3)
        body += "<h3>Training configuration</h3><div class=\"cols\">" + "".join(
            _table(["option", "value"], [[_td(k), _td(v)] for k, v in config[i:i + third]])
            for i in range(0, len(config), third)) + "</div>"
    sections.append(_section("config", "Run configuration", body))

    # training curves
    curves = [k for k in ("loss_curve", "accuracy_curve") if k in figures]
    body = (f'<div class="figs">{"".join(_img(figures[k], k.replace("_", " ")) for k in curves)}</div>' if curves
            else '<p class="note">No training history found next to the model (summary.csv or '
                 'gender_checkpoint.pth).</p>')
    sections.append(_section("training", "Training curves", body))

    # confusion matrix
    cm = metrics["confusion_matrix"]
    cm_rows = [[f"<th>{_e(c)}</th>"] + [_td(v, True) for v in cm[i]] for i, c in enumerate(classes)]
    body = (f'<div class="figs">{_img(figures["confusion_matrix"], "confusion matrix")}</div>'
            + _table(["true \\ predicted", *classes], cm_rows))
    sections.append(_section("confusion", "Confusion matrix", body))

    # per-class
    per = metrics["per_class"]
    rows = [[_td(c), _td(per[c]["support"], True), _td(f"{per[c]['precision']:.4f}", True),
             _td(f"{per[c]['recall']:.4f}", True), _td(f"{per[c]['f1']:.4f}", True)] for c in classes]
    sections.append(_section("per-class", "Per-class metrics",
                             _table(["class", "images", "precision", "recall", "F1"], rows)))

    # calibration
    rows = [[_td("expected calibration error"), _td(f"{metrics['ece']:.4f}", True),
             _td(f"{metrics['ece_calibrated']:.4f}", True)],
            [_td("negative log-likelihood"), _td(f"{metrics['loss']:.4f}", True),
             _td(f"{metrics['loss_calibrated']:.4f}", True)]]
    body = (_table(["", "before", f"after temperature {metrics['temperature']:.3f}"], rows)
            + '<p class="note">The temperature is fitted on the validation split after training; '
              f'ECE uses {metrics["n_bins"]} equal-width confidence bins.</p>'
            + f'<div class="figs">{_img(figures["reliability"], "reliability diagram before temperature")}'
              f'{_img(figures["reliability_calibrated"], "reliability diagram after temperature")}</div>')
    sections.append(_section("calibration", "Calibration", body))

    # groups
    if metrics.get("groups"):
        body = f'<p class="note">Groups from {_e(groups_file or "the groups file")}.</p>'
        for column, g in metrics["groups"].items():
            rows, flags = [], []
            for name, v in g["groups"].items():
                row = [_td(name), _td(v["n"], True),
                       _td(f"{_pct(v['accuracy'])} ({_ci(v['accuracy_ci'])})", True)]
                row += [_td(f"{_pct(v['recall'][c]['recall'])} ({_ci(v['recall'][c]['ci'])}), n={v['recall'][c]['n']}"
                            if v["recall"][c]["n"] else "-", True) for c in classes]
                row.append(_td(f"too few (<{g['min_count']})" if v["too_few"] else ""))
                rows.append(row)
                flags.append("few" if v["too_few"] else "")
            body += f"<h3>By {_e(column)}</h3>" + _table(
                ["group", "images", "accuracy (95% CI)", *[f"recall {c} (95% CI)" for c in classes], "flag"],
                rows, flags)
            if g["worst_group"] is not None:
                body += (f'<p>Worst group: <span class="bad">{_e(g["worst_group"])}</span> '
                         f'({_pct(g["worst_accuracy"])}); best: {_e(g["best_group"])}; largest accuracy gap '
                         f'{_pct(g["accuracy_gap"])}.')
                wc = g.get("worst_class_recall")
                if wc:
                    body += (f' Lowest class recall: {_e(wc["class"])} in {_e(wc["group"])} '
                             f'({_pct(wc["recall"])}, n={wc["n"]}).')
                body += "</p>"
            if g.get("note"):
                body += f'<p class="note">{_e(g["note"])}</p>'
            elif sum(not v["too_few"] for v in g["groups"].values()) == 1:
                body += (f'<p class="note">Only one group has {g["min_count"]} or more images, so there is no '
                         'reliable gap to measure; the smaller groups are shown but not compared.</p>')
            key = f"groups_{column}"
            if key in figures:
                body += f'<div class="figs">{_img(figures[key], f"accuracy by {column}")}</div>'
    else:
        body = ('<p class="note">No groups file: pass --groups groups.csv (columns path,label,&lt;group '
                'columns&gt;; <code>facegender import</code> writes one) for per-group accuracy.</p>')
    sections.append(_section("groups", "Per-group accuracy", body))

    # coverage
    rows = [[_td(f"{p['threshold']:.2f}", True), _td(_pct(p["coverage"]), True), _td(p["n_kept"], True),
             _td(_pct(p["accuracy"], 2), True)] for p in metrics["coverage_curve"]]
    body = ('<p class="note">An image is answered when its calibrated top probability reaches the threshold '
            '(<code>facegender predict --min-confidence</code>); the others are "uncertain".</p>'
            + f'<div class="figs">{_img(figures["coverage"], "coverage and accuracy by threshold")}</div>'
            + _table(["minimum confidence", "coverage", "answered", "accuracy on answered"], rows))
    sections.append(_section("coverage", "Coverage and accuracy by confidence threshold", body))

    # mistakes
    if gallery:
        cards = []
        for m in gallery:
            uri = m.get("thumbnail")
            pic = f'<img src="{uri}" alt="{_e(Path(m["path"]).name)}">' if uri else "<p>(unreadable)</p>"
            cards.append(f'<figure class="mistake">{pic}<figcaption><b>{_e(Path(m["path"]).name)}</b><br>'
                         f'true: {_e(m["true"])}<br>predicted: <span class="bad">{_e(m["predicted"])}</span><br>'
                         f'probability {m["probability"]:.3f}</figcaption></figure>')
        body = ('<p class="note">Wrong predictions with the highest calibrated probability, most confident '
                f'first ({len(gallery)} shown).</p><div class="gallery">{"".join(cards)}</div>')
    else:
        body = '<p class="note">No mistakes on this set.</p>'
    sections.append(_section("mistakes", "Most confident mistakes", body))

    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t in (
        ("summary", "Summary"), ("config", "Config"), ("training", "Training"), ("confusion", "Confusion"),
        ("per-class", "Per class"), ("calibration", "Calibration"), ("groups", "Groups"),
        ("coverage", "Coverage"), ("mistakes", "Mistakes")))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>facegender report: {_e(record.get('backbone', 'model'))} on {_e(Path(data_dir).name)}</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<header><h1>facegender evaluation report</h1><p>model: {_e(model_path)}</p>"
            f"<p>data: {_e(data_dir)} ({metrics['n']} images)</p><p>generated {_e(when)}</p></header>"
            f"<nav>{nav}</nav><main>{''.join(sections)}</main></body></html>\n")


# ----------------------------------------------------------------------------- entry points

def write_report(pred: Predictions, record: dict, out: str | os.PathLike, model_path: str, data_dir: str,
                 groups_file: str | os.PathLike | None = None, min_confidence: float | None = None,
                 min_group_size: int = 30, n_mistakes: int = 12, note: str | None = None) -> tuple[Path, dict]:
    """Analyse `pred` and write the HTML report to `out`; returns (path, metrics)."""
    from facegender import checkpoint as ckpt

    groups, matched = (None, 0)
    if groups_file is not None:
        groups, matched = read_groups(groups_file, pred.paths, data_dir)
    metrics = analyse(pred, groups, min_confidence, min_group_size)
    if groups_file is not None:
        metrics.update(groups_file=str(groups_file), groups_matched=matched)
    gallery = mistakes(pred, n_mistakes)
    for m in gallery:
        m["thumbnail"] = thumbnail_uri(m["path"])
    best_epoch = (record.get("metrics") or {}).get("best_epoch") or record.get("epoch")
    with tempfile.TemporaryDirectory(prefix="facegender-report-") as tmp:
        figures = write_figures(metrics, tmp, title=Path(data_dir).name)
        figures.update(training_curves(model_path, tmp, best_epoch))
        text = render_html(metrics, record, figures, gallery, str(model_path), str(data_dir),
                           str(groups_file) if groups_file else None, note)
    return ckpt.write_text_atomic(text, out), metrics


def build_report(model_path: str, data_dir: str, out: str = "report.html", groups: str | None = None,
                 min_confidence: float | None = None, min_group_size: int = 30, tta: bool | None = None,
                 batch_size: int = 64, device: str = "auto", skip_bad: bool = False, n_mistakes: int = 12,
                 log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """`facegender report`: evaluate the model on `data_dir`/<class>/* and write one HTML file.

    `groups` None uses DATASET/groups.csv when `data_dir` is DATASET/<split> and that file exists."""
    from facegender.engine import select_device, select_precision
    from facegender.evaluate import load_labelled

    model, record, loaded, prep, loader = load_labelled(model_path, data_dir, skip_bad, log, progress)
    dev = select_device(device)
    model.to(dev)
    tta = record.get("tta", False) if tta is None else tta
    pred = predict_loaded(model, loaded, prep, record["classes"], record.get("temperature", 1.0), tta, dev,
                          select_precision("auto", dev), batch_size, loader=loader, progress=progress)
    if groups is None and (Path(data_dir).parent / GROUPS_FILE).is_file():
        groups = str(Path(data_dir).parent / GROUPS_FILE)
        log(f"using groups from {groups}")
    path, metrics = write_report(pred, record, out, model_path, data_dir, groups, min_confidence, min_group_size,
                                 n_mistakes=n_mistakes)
    log(f"{path}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}), ECE {metrics['ece']:.4f} -> "
        f"{metrics['ece_calibrated']:.4f}")
    return path


def write_run_report(cfg, out: Path, data, log: Callable[[str], None] = print, progress: bool = True) -> Path | None:
    """report.html of a finished training run (`train.finish`): the best model on the test images
    already in memory, the run's history, and DATASET/groups.csv when it exists. A failure here is
    reported and does not fail the finished run."""
    from facegender import checkpoint as ckpt
    from facegender.engine import select_device, select_precision

    try:
        if data.test is None or not len(data.test.split):
            return None
        device = select_device(cfg.device)
        model, record = ckpt.load_model(out / "best_model.pth", device)
        pred = predict_loaded(model, data.test, data.prep, record["classes"], record.get("temperature", 1.0),
                              bool(record.get("tta", False)), device, select_precision(cfg.precision, device),
                              cfg.batch_size * 2, loader=data.loader, progress=progress)
        groups = Path(cfg.data) / GROUPS_FILE
        note = ("The test set also chose the best epoch (--val-on-test): its accuracy is optimistic."
                if cfg.val_on_test else None)
        path, _ = write_report(pred, record, out / "report.html", str(out / "best_model.pth"),
                               str(Path(cfg.data) / "test"), groups if groups.is_file() else None, note=note)
        return path
    except Exception as exc:  # noqa: BLE001 - the trained model is saved; the report is extra
        log(f"WARNING: report.html not written ({exc.__class__.__name__}: {exc}); "
            f"write it with: facegender report --model {out / 'best_model.pth'} --data {cfg.data}/test")
        return None
