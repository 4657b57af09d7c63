"""`facegender cv`: stratified k-fold cross-validation of the training recipe on DATASET/train.

Each fold is an ordinary training run (`training.train.train`, the same recipe and options) in its own
folder OUT/fold_<k>/, whose validation part is fold k of a seeded `StratifiedKFold` over
DATASET/train (the config fields `cv_folds`/`cv_fold` select it, so a fold's checkpoint describes
the fold completely). That held-out part chooses the best epoch and stops training early, so its
accuracy is slightly optimistic; each fold is also evaluated once on DATASET/test, which no fold
ever sees.

Folds run one after another. A finished fold (its `fold_result.json`) is skipped when the command
is run again; an interrupted fold continues from its `gender_checkpoint.pth`. `time_budget_min`
stops starting new folds once that much time has passed. Results: OUT/cv_results.json (config,
per-fold numbers, mean and standard deviation) and OUT/cv_summary.csv (one row per fold, then mean
and std rows).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facegender.core import files
from facegender.core.errors import ConfigError
from facegender.data.dataset import Split, fold_split, plan_folds, scan_dataset  # noqa: F401  (fold_split: cv.fold_split)
from facegender.training import train as training

RESULT = "fold_result.json"
RESULTS = "cv_results.json"
SUMMARY = "cv_summary.csv"
#: Options that may differ between the run that started a fold and the one that resumes it.
_FREE_KEYS = {"out", "device", "workers", "precision"}


def dataset_fingerprint(train: Split) -> str:
    """A short hash of the training file list and labels: resumed folds must see the same data."""
    h = hashlib.sha1()
    for p, label in zip(train.paths, train.labels):
        h.update(f"{Path(p).as_posix()}\t{label}\n".encode())
    return h.hexdigest()[:16]


def fold_config(cfg, n_folds: int, fold: int, out: Path):
    """The TrainConfig of one fold: the recipe of `cfg`, its own folder, fold `fold` held out."""
    return dataclasses.replace(cfg, out=str(out / f"fold_{fold}"), cv_folds=n_folds, cv_fold=fold)


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _FREE_KEYS}


def _check_same_recipe(saved: dict, current: dict, where: Path) -> None:
    a, b = _comparable(saved), _comparable(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in diff)
        raise ConfigError(
            f"{where} was made with different options ({shown}); rerun with the same options "
            "to continue this cross-validation, or pass a new --out"
        )


def _fold_row(fold: int, summary: dict, classes: list[str], n_train: int, seconds: float) -> dict:
    """The numbers of one finished fold (from `training.train.train`'s summary)."""
    val, test = summary["validation"], summary.get("test")
    return {
        "fold": fold,
        "n_train": n_train,
        "n_val": val["n"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "val_accuracy": val["accuracy"],
        "val_recall": {c: val["per_class"][c]["recall"] for c in classes},
        "val_ece": val["ece"],
        "test_accuracy": test["accuracy"] if test else None,
        "test_recall": {c: test["per_class"][c]["recall"] for c in classes} if test else None,
        "temperature": summary["temperature"],
        "seconds": round(seconds, 1),
    }


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """{'mean', 'std', 'n'} of the values that are not None; std is the sample standard deviation
    (n - 1), None with fewer than two values."""
    vals = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
    }


def summarise(rows: list[dict], classes: list[str]) -> dict[str, Any]:
    """Mean and standard deviation over folds of accuracy and each class's recall."""
    out = {
        "val_accuracy": mean_std([r["val_accuracy"] for r in rows]),
        "val_recall": {c: mean_std([r["val_recall"][c] for r in rows]) for c in classes},
        "test_accuracy": mean_std([r["test_accuracy"] for r in rows]),
        "test_recall": {c: mean_std([(r["test_recall"] or {}).get(c) for r in rows]) for c in classes},
    }
    return out


def _fmt(ms: dict) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}" if ms["std"] is not None else f"{ms['mean']:.4f}"


def summary_csv(rows: list[dict], summary: dict, classes: list[str]) -> str:
    """cv_summary.csv: one row per fold, then a `mean` and a `std` row."""
    cols = [
        "fold",
        "n_train",
        "n_val",
        "best_epoch",
        "epochs_run",
        "val_accuracy",
        *[f"val_recall_{c}" for c in classes],
        "test_accuracy",
        *[f"test_recall_{c}" for c in classes],
        "temperature",
        "seconds",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        flat = {k: r[k] for k in cols if k in r}
        flat.update({f"val_recall_{c}": r["val_recall"][c] for c in classes})
        flat.update({f"test_recall_{c}": (r["test_recall"] or {}).get(c) for c in classes})
        writer.writerow(flat)
    for stat in ("mean", "std"):
        row = {
            "fold": stat,
            "val_accuracy": summary["val_accuracy"][stat],
            "test_accuracy": summary["test_accuracy"][stat],
        }
        row.update({f"val_recall_{c}": summary["val_recall"][c][stat] for c in classes})
        row.update({f"test_recall_{c}": summary["test_recall"][c][stat] for c in classes})
        writer.writerow(row)
    return buf.getvalue()


def format_table(rows: list[dict], summary: dict, classes: list[str]) -> str:
    """The per-fold table and the mean ± std line, for the terminal."""
    head = (
        f"{'fold':>4} {'n_val':>5} {'best':>4} {'val_acc':>8} "
        + " ".join(f"{'rec_' + c:>12.12}" for c in classes)
        + f" {'test_acc':>8}"
    )
    lines = [head]
    for r in rows:
        test = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        lines.append(
            f"{r['fold']:>4} {r['n_val']:>5} {r['best_epoch']:>4} {r['val_accuracy']:>8.4f} "
            + " ".join(f"{r['val_recall'][c]:>12.4f}" for c in classes)
            + f" {test:>8}"
        )
    lines.append(f"validation accuracy (held-out fold, also used for early stopping) {_fmt(summary['val_accuracy'])}")
    for c in classes:
        lines.append(f"  recall {c}: {_fmt(summary['val_recall'][c])}")
    lines.append(f"test accuracy (DATASET/test, per fold's model) {_fmt(summary['test_accuracy'])}")
    return "\n".join(lines)


@dataclasses.dataclass
class _CrossValidation:
    """What the steps of `run_cv` share: the recipe, the folds over DATASET/train and where results go."""

    cfg: Any  # TrainConfig, data = [absolute DATASET]
    n_folds: int
    classes: list[str]
    train_split: Split
    folds: list
    fingerprint: str

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS

    def n_train(self, fold: int) -> int:
        return len(self.train_split) - len(self.folds[fold - 1])


def run_cv(
    cfg,
    n_folds: int = 5,
    time_budget_min: float | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate the recipe `cfg` (a TrainConfig; `cfg.out` is the cross-validation folder).

    Returns the content of cv_results.json; `complete` is False when the time budget stopped it
    before every fold had finished (rerun the same command to continue)."""
    cv = _plan_cv(cfg, n_folds)
    log(
        f"{n_folds}-fold stratified cross-validation of {cv.cfg.backbone} on {cv.cfg.data[0]}/train "
        f"({len(cv.train_split)} images, classes {cv.classes}); folds in {cv.out}/fold_<k>/"
    )
    started = time.monotonic()
    rows: list[dict] = []
    stopped_by_budget = False
    cv.out.mkdir(parents=True, exist_ok=True)
    for fold in range(1, n_folds + 1):
        fcfg = fold_config(cv.cfg, n_folds, fold, cv.out)
        finished = _finished_fold(fcfg, fold, n_folds, log)
        if finished is not None:
            rows.append(finished)
            continue
        if time_budget_min is not None and time.monotonic() - started >= time_budget_min * 60:
            stopped_by_budget = True
            missing = [k for k in range(fold, n_folds + 1) if not (cv.out / f"fold_{k}" / RESULT).is_file()]
            log(
                f"time budget of {time_budget_min:g} min used up: not starting fold(s) {missing}; "
                "run the same command again to continue"
            )
            break
        rows.append(_run_fold(cv, fcfg, fold, rows, log, progress))
        _write_results(cv, rows)
    result = _write_results(cv, rows)
    result["stopped_by_time_budget"] = stopped_by_budget
    log(format_table(rows, result["summary"], cv.classes))
    if not result["complete"]:
        log(f"{len(rows)} of {n_folds} folds finished; missing {result['missing_folds']}")
    log(f"results: {cv.results_path}, {cv.out / SUMMARY}")
    return result


def _plan_cv(cfg, n_folds: int) -> _CrossValidation:
    """Check the options, plan the folds (failing early on a class too small) and check that an
    earlier cv_results.json in the folder is of this recipe, fold count and data."""
    if cfg.val_on_test:
        raise ConfigError("--val-on-test cannot be combined with cv: each fold validates on its held-out part")
    if len(cfg.data) != 1:
        raise ConfigError("cv cross-validates one dataset: pass a single --data DATASET")
    cfg = dataclasses.replace(cfg, data=[os.path.abspath(cfg.data[0])], cv_folds=0, cv_fold=0)
    classes, train_split, _ = scan_dataset(cfg.data[0], need_test=True)
    folds = plan_folds(train_split.labels, n_folds, cfg.seed)
    cv = _CrossValidation(cfg, n_folds, classes, train_split, folds, dataset_fingerprint(train_split))
    if cv.results_path.is_file():
        previous = json.loads(cv.results_path.read_text(encoding="utf-8"))
        _check_same_recipe(previous["config"], cfg.to_dict(), cv.results_path)
        if previous.get("folds") != n_folds or previous.get("dataset_fingerprint") != cv.fingerprint:
            raise ConfigError(
                f"{cv.results_path} is a {previous.get('folds')}-fold run on other training files; "
                "pass a new --out (or the same --folds and data) to continue it"
            )
    return cv


def _finished_fold(fcfg, fold: int, n_folds: int, log: Callable[[str], None]) -> dict | None:
    """The row of a fold that an earlier run finished (its fold_result.json, of the same recipe), or None."""
    done = Path(fcfg.out) / RESULT
    if not done.is_file():
        return None
    saved = json.loads(done.read_text(encoding="utf-8"))
    _check_same_recipe(saved["config"], fcfg.to_dict(), done)
    log(f"fold {fold}/{n_folds}: already finished ({done}), skipped")
    return saved["result"]


def _run_fold(
    cv: _CrossValidation, fcfg, fold: int, rows: list[dict], log: Callable[[str], None], progress: bool
) -> dict:
    """Train fold `fold` (continuing its checkpoint, if any) and write its fold_result.json; its
    row. On Ctrl-C the results so far (`rows`) are written before TrainingInterrupted goes on."""
    state = None
    checkpoint = Path(fcfg.out) / training.CHECKPOINT
    if checkpoint.is_file():
        resumed_cfg, state = training.resume_config(str(checkpoint))
        _check_same_recipe(resumed_cfg.to_dict(), fcfg.to_dict(), checkpoint)
        log(f"fold {fold}/{cv.n_folds}: resuming from {checkpoint}")
    else:
        log(f"fold {fold}/{cv.n_folds}: training on {cv.n_train(fold)} images, validating on {len(cv.folds[fold - 1])}")
    t0 = time.monotonic()
    try:
        summary = training.train(fcfg, state, log=log, progress=progress)
    except training.TrainingInterrupted:
        _write_results(cv, rows)
        log(f"cross-validation interrupted in fold {fold}; run the same command again to resume it")
        raise
    row = _fold_row(fold, summary, cv.classes, cv.n_train(fold), time.monotonic() - t0)
    files.write_text_atomic(
        json.dumps({"config": fcfg.to_dict(), "result": row}, indent=2, ensure_ascii=False), Path(fcfg.out) / RESULT
    )
    return row


def _write_results(cv: _CrossValidation, rows: list[dict]) -> dict:
    """cv_results.json and cv_summary.csv of the folds finished so far; cv_results.json's content."""
    n_folds, classes = cv.n_folds, cv.classes
    summary = summarise(rows, classes)
    result = {
        "config": cv.cfg.to_dict(),
        "folds": n_folds,
        "seed": cv.cfg.seed,
        "classes": classes,
        "dataset_fingerprint": cv.fingerprint,
        "fold_sizes": [int(len(f)) for f in cv.folds],
        "complete": len(rows) == n_folds,
        "finished_folds": [r["fold"] for r in rows],
        "missing_folds": [k for k in range(1, n_folds + 1) if k not in {r["fold"] for r in rows}],
        "per_fold": rows,
        "summary": summary,
        "std_note": "sample standard deviation over folds (n - 1)",
        "val_note": "validation = the fold's held-out part, which also chose the best epoch "
        "(slightly optimistic); test = DATASET/test, never used in training",
    }
    files.write_text_atomic(json.dumps(result, indent=2, ensure_ascii=False), cv.results_path)
    files.write_text_atomic(summary_csv(rows, summary, classes), cv.out / SUMMARY)
    return result
