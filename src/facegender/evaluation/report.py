"""`facegender report`: one self-contained HTML page per model, from the analysis of
`evaluate.analyse` (calibration, TTA beside the plain model, per-group accuracy, coverage).

`build_report` writes ONE HTML file: every figure and thumbnail is embedded as a base64 data URI,
the CSS is inline, and a Content-Security-Policy forbids loading anything from elsewhere, so the
file can be mailed or archived as it is. The page is the Jinja2 template templates/report.html.j2,
rendered from `report_context` with autoescaping: every string that comes from data (file names, class
and group names, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from facegender.core import files
from facegender.core.model import DEFAULT_PRECISION, load
from facegender.evaluation.evaluate import GROUPS_FILE, analyse, mistakes, read_groups, write_figures
from facegender.evaluation.plots import plot_curves
from facegender.evaluation.predictions import Predictions, predict_labelled


def training_curves(
    model_path: str | os.PathLike, folder: str | os.PathLike, best_epoch: int | None = None
) -> dict[str, Path]:
    """loss_curve/accuracy_curve of the model's run: the PNGs `train` wrote next to the model, or
    drawn into `folder` from the run's history (`load_history`); {} when there is no history."""
    run = Path(model_path).parent
    names = {"loss_curve": ("loss", "Loss per epoch"), "accuracy_curve": ("acc", "Accuracy per epoch")}
    if Path(model_path).name == files.BEST_MODEL and all((run / f"{n}.png").is_file() for n in names):
        return {n: run / f"{n}.png" for n in names}
    history = load_history(model_path)
    if not history:
        return {}
    return {
        n: plot_curves(history, key, Path(folder) / f"{n}.png", title, best_epoch) for n, (key, title) in names.items()
    }


# ----------------------------------------------------------------------------- training history


def load_history(model_path: str | os.PathLike) -> list[dict] | None:
    """Training history of the run a model file belongs to: the summary.csv that `train` writes
    next to it (one row per epoch); None when there is none. Read without PyTorch."""
    summary = Path(model_path).parent / files.SUMMARY_CSV
    if not summary.is_file():
        return None
    with open(summary, newline="", encoding="utf-8") as f:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return rows if rows and {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(rows[0]) else None


def _number(text: str):
    try:
        return int(text)
    except (TypeError, ValueError):
        try:
            return float(text)
        except (TypeError, ValueError):
            return text


# ----------------------------------------------------------------------------- HTML

TEMPLATE = "report.html.j2"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates of evaluation/templates, autoescaped, with the report's number filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("facegender.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(("html", "html.j2"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, ci=_ci)
    return env


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _value(v: Any) -> str:
    """A model-record value as the report shows it: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(path: str | os.PathLike, size: int = 128) -> str | None:
    """A JPEG thumbnail of an image file as a data URI (None when the file cannot be read)."""
    from facegender.core.images import ImageError, load_image

    try:
        im = load_image(path)
    except (ImageError, OSError):
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def summary_rows(metrics: dict) -> list[tuple[str, str, bool]]:
    """The Summary table: (label, value, numeric) rows."""
    classes, threshold = metrics["class_names"], metrics.get("threshold")
    rows = [
        ("images", str(metrics["n"]), True),
        ("accuracy (95% Wilson CI)", f"{_pct(metrics['accuracy'], 2)} ({_ci(metrics['accuracy_ci'])})", True),
        ("balanced accuracy", _pct(metrics["balanced_accuracy"], 2), True),
        ("macro F1", f"{metrics['macro_f1']:.4f}", True),
        (
            f"ECE ({metrics['n_bins']} bins) before → after temperature {metrics['temperature']:.3f}",
            f"{metrics['ece']:.4f} → {metrics['ece_calibrated']:.4f}",
            True,
        ),
        ("test-time augmentation", "horizontal flip" if metrics["tta"] else "none", False),
        ("decision", "arg-max" if threshold is None else f"{classes[1]} when its probability ≥ {threshold:.4g}", False),
    ]
    if "without_tta" in metrics:
        w = metrics["without_tta"]
        rows.append(
            (
                "without TTA: accuracy (95% CI), ECE after temperature",
                f"{_pct(w['accuracy'], 2)} ({_ci(w['accuracy_ci'])}), {w['ece_calibrated']:.4f}",
                True,
            )
        )
    if "selective" in metrics:
        s = metrics["selective"]
        rows.append(
            (
                f"at minimum confidence {s['min_confidence']:g}: coverage, accuracy on answered",
                f"{_pct(s['coverage'])} ({s['n_covered']}/{s['n']}), {_pct(s['accuracy_on_covered'], 2)}",
                True,
            )
        )
    return rows


def model_rows(record: dict) -> list[tuple[str, str]]:
    """The model table of Run configuration: what the model file records, and its recorded metrics."""
    info = [
        ("backbone", record.get("backbone")),
        ("classes", ", ".join(map(str, record.get("classes", [])))),
        ("pretrained", record.get("pretrained")),
        ("weights", record.get("weights_source")),
        ("best epoch", record.get("epoch")),
        ("temperature", record.get("temperature")),
        ("TTA in model file", record.get("tta")),
    ]
    for split, m in (record.get("metrics") or {}).items():
        if isinstance(m, dict):
            info.append((f"recorded {split} metrics", ", ".join(f"{k}={_value(v)}" for k, v in m.items())))
    return [(name, _value(v)) for name, v in info]


def config_columns(config: Mapping | None) -> list[list[tuple[str, Any]]]:
    """The training configuration's (option, value) pairs in three columns."""
    items = list((config or {}).items())
    third = max(1, -(-len(items) // 3))
    return [items[i : i + third] for i in range(0, len(items), third)]


def mistake_cards(gallery: list[dict]) -> list[dict]:
    """The gallery's captions: file name, true and predicted class, probability, thumbnail."""
    return [
        {
            "name": Path(m["path"]).name,
            "true": m["true"],
            "predicted": m["predicted"],
            "probability": m["probability"],
            "thumbnail": m.get("thumbnail"),
        }
        for m in gallery
    ]


def report_context(
    metrics: dict,
    record: dict,
    figures: Mapping[str, Path],
    gallery: list[dict],
    model_path: str,
    data_dir: str,
    groups_file: str | None = None,
    note: str | None = None,
) -> dict:
    """What report.html.j2 renders: the analysis (`m`), the rows formatted here, and every figure as a
    base64 PNG data URI."""
    classes = metrics["class_names"]
    return {
        "m": metrics,
        "classes": classes,
        "recall_headers": [f"recall {c} (95% CI)" for c in classes],
        "backbone": record.get("backbone", "model"),
        "data_name": Path(data_dir).name,
        "model_path": model_path,
        "data_dir": data_dir,
        "groups_file": groups_file,
        "note": note,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "csp": CSP,
        "summary": summary_rows(metrics),
        "model_info": model_rows(record),
        "config_columns": config_columns(record.get("config")),
        "images": {k: _data_uri(Path(p).read_bytes(), "image/png") for k, p in figures.items()},
        "curves": [k for k in ("loss_curve", "accuracy_curve") if k in figures],
        "gallery": mistake_cards(gallery),
    }


def render_html(
    metrics: dict,
    record: dict,
    figures: Mapping[str, Path],
    gallery: list[dict],
    model_path: str,
    data_dir: str,
    groups_file: str | None = None,
    note: str | None = None,
) -> str:
    """The report page (a string) from templates/report.html.j2; `figures` from
    `evaluate.write_figures`, `gallery` from `evaluate.mistakes`."""
    context = report_context(metrics, record, figures, gallery, model_path, data_dir, groups_file, note)
    return _environment().get_template(TEMPLATE).render(context)


# ----------------------------------------------------------------------------- entry points


def write_report(
    pred: Predictions,
    record: dict,
    out: str | os.PathLike,
    model_path: str,
    data_dir: str,
    groups_file: str | os.PathLike | None = None,
    min_confidence: float | None = None,
    min_group_size: int = 30,
    n_mistakes: int = 12,
    note: str | None = None,
) -> tuple[Path, dict]:
    """Analyse `pred` and write the HTML report to `out`; returns (path, metrics)."""
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
        text = render_html(
            metrics,
            record,
            figures,
            gallery,
            str(model_path),
            str(data_dir),
            str(groups_file) if groups_file else None,
            note,
        )
    return files.write_text_atomic(text, out), metrics


def build_report(
    model_path: str,
    data_dir: str,
    out: str = "report.html",
    groups: str | None = None,
    min_confidence: float | None = None,
    min_group_size: int = 30,
    tta: bool | None = None,
    batch_size: int = 64,
    device: str = "auto",
    skip_bad: bool = False,
    n_mistakes: int = 12,
    log: Callable[[str], None] = print,
    progress: bool = True,
    precision: str = DEFAULT_PRECISION,
    threshold: float | None = None,
) -> Path:
    """`facegender report`: evaluate the model on `data_dir`/<class>/* and write one HTML file.

    `groups` None uses DATASET/groups.csv when `data_dir` is DATASET/<split> and that file exists;
    `threshold` None decides as the model does (`evaluate.evaluate_model`)."""
    model = load(
        model_path,
        device=device,
        precision=precision,
        detect=False,
        **({} if tta is None else {"tta": tta}),
        **({} if threshold is None else {"threshold": threshold}),
    )
    pred = predict_labelled(model, data_dir, skip_bad, batch_size, log=log, progress=progress)
    if groups is None and (Path(data_dir).parent / GROUPS_FILE).is_file():
        groups = str(Path(data_dir).parent / GROUPS_FILE)
        log(f"using groups from {groups}")
    path, metrics = write_report(
        pred, model.record, out, model_path, data_dir, groups, min_confidence, min_group_size, n_mistakes=n_mistakes
    )
    log(
        f"{path}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}), ECE {metrics['ece']:.4f} -> "
        f"{metrics['ece_calibrated']:.4f}"
    )
    return path


def write_run_report(
    cfg, out: Path, pred: Predictions | None, record: dict, log: Callable[[str], None] = print
) -> Path | None:
    """report.html of a finished training run (`training.train.finish`): the test predictions made there
    (`pred`, None without a test set), the best model's `record`, the run's history, and
    DATASET/groups.csv when it exists. A failure here is reported and does not fail the finished run."""
    try:
        if pred is None or not len(pred.paths):
            return None
        groups = Path(cfg.data[0]) / GROUPS_FILE
        note = (
            "The test set also chose the best epoch (--val-on-test): its accuracy is optimistic."
            if cfg.val_on_test
            else None
        )
        tested = ", ".join(f"{d}/test" for d in cfg.data if (Path(d) / "test").is_dir())
        path, _ = write_report(
            pred,
            record,
            out / files.REPORT_HTML,
            str(out / files.BEST_MODEL),
            tested,
            groups if groups.is_file() else None,
            note=note,
        )
        return path
    except Exception as exc:  # noqa: BLE001 - the trained model is saved; the report is extra
        log(
            f"WARNING: report.html not written ({exc.__class__.__name__}: {exc}); "
            f"write it with: facegender report --model {out / 'best_model.pth'} --data {cfg.data[0]}/test"
        )
        return None
