"""`facegender report`: one self-contained HTML page per model, from the analysis of
`evaluate.analyse` (calibration, TTA beside the plain model, per-group accuracy, coverage).

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
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from facegender.evaluation.predictions import predict_labelled
from facegender.core import files
from facegender.evaluation.evaluate import GROUPS_FILE, analyse, mistakes, read_groups, write_figures
from facegender.core.model import DEFAULT_PRECISION, load
from facegender.evaluation.predictions import Predictions
from facegender.evaluation.plots import plot_curves


def training_curves(model_path: str | os.PathLike, folder: str | os.PathLike,
                    best_epoch: int | None = None) -> dict[str, Path]:
    """loss_curve/accuracy_curve of the model's run: the PNGs `train` wrote next to the model, or
    drawn into `folder` from the run's history (`load_history`); {} when there is no history."""
    run = Path(model_path).parent
    names = {"loss_curve": ("loss", "Loss per epoch"), "accuracy_curve": ("acc", "Accuracy per epoch")}
    if Path(model_path).name == files.BEST_MODEL and all((run / f"{n}.png").is_file() for n in names):
        return {n: run / f"{n}.png" for n in names}
    history = load_history(model_path)
    if not history:
        return {}
    return {n: plot_curves(history, key, Path(folder) / f"{n}.png", title, best_epoch)
            for n, (key, title) in names.items()}


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
    from facegender.core.images import ImageError, load_image

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
            [_td("test-time augmentation"), _td("horizontal flip" if metrics["tta"] else "none")],
            [_td("decision"), _td("arg-max" if metrics.get("threshold") is None
                                  else f"{classes[1]} when its probability ≥ {metrics['threshold']:.4g}")]]
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
    body = ('<p class="note">An image is answered when the calibrated probability of its predicted class reaches the threshold '
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
    return files.write_text_atomic(text, out), metrics


def build_report(model_path: str, data_dir: str, out: str = "report.html", groups: str | None = None,
                 min_confidence: float | None = None, min_group_size: int = 30, tta: bool | None = None,
                 batch_size: int = 64, device: str = "auto", skip_bad: bool = False, n_mistakes: int = 12,
                 log: Callable[[str], None] = print, progress: bool = True,
                 precision: str = DEFAULT_PRECISION, threshold: float | None = None) -> Path:
    """`facegender report`: evaluate the model on `data_dir`/<class>/* and write one HTML file.

    `groups` None uses DATASET/groups.csv when `data_dir` is DATASET/<split> and that file exists;
    `threshold` None decides as the model does (`evaluate.evaluate_model`)."""
    model = load(model_path, device=device, precision=precision, detect=False,
                 **({} if tta is None else {"tta": tta}), **({} if threshold is None else {"threshold": threshold}))
    pred = predict_labelled(model, data_dir, skip_bad, batch_size, log=log, progress=progress)
    if groups is None and (Path(data_dir).parent / GROUPS_FILE).is_file():
        groups = str(Path(data_dir).parent / GROUPS_FILE)
        log(f"using groups from {groups}")
    path, metrics = write_report(pred, model.record, out, model_path, data_dir, groups, min_confidence,
                                 min_group_size, n_mistakes=n_mistakes)
    log(f"{path}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}), ECE {metrics['ece']:.4f} -> "
        f"{metrics['ece_calibrated']:.4f}")
    return path


def write_run_report(cfg, out: Path, pred: Predictions | None, record: dict,
                     log: Callable[[str], None] = print) -> Path | None:
    """report.html of a finished training run (`train.finish`): the test predictions made there
    (`pred`, None without a test set), the best model's `record`, the run's history, and
    DATASET/groups.csv when it exists. A failure here is reported and does not fail the finished run."""
    try:
        if pred is None or not len(pred.paths):
            return None
        groups = Path(cfg.data[0]) / GROUPS_FILE
        note = ("The test set also chose the best epoch (--val-on-test): its accuracy is optimistic."
                if cfg.val_on_test else None)
        tested = ", ".join(f"{d}/test" for d in cfg.data if (Path(d) / "test").is_dir())
        path, _ = write_report(pred, record, out / files.REPORT_HTML, str(out / files.BEST_MODEL),
                               tested, groups if groups.is_file() else None, note=note)
        return path
    except Exception as exc:  # noqa: BLE001 - the trained model is saved; the report is extra
        log(f"WARNING: report.html not written ({exc.__class__.__name__}: {exc}); "
            f"write it with: facegender report --model {out / 'best_model.pth'} --data {cfg.data[0]}/test")
        return None
