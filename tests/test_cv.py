"""Cross-validation: fold planning, one real tiny run, skipping finished folds, resuming an
interrupted fold, the time budget, and the CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
from conftest import make_dataset

from facegender.data.dataset import DatasetError, Split
from facegender.training import cv
from facegender.training import train as training
from facegender.training.config import build_config


def test_folds_are_disjoint_cover_everything_and_are_stratified():
    labels = [0] * 23 + [1] * 11 + [2] * 7
    folds = cv.plan_folds(labels, 5, seed=3)
    assert len(folds) == 5
    together = np.concatenate(folds)
    assert sorted(together.tolist()) == list(range(len(labels)))  # every index exactly once
    share = Counter(labels)
    for fold in folds:
        counts = Counter(labels[i] for i in fold)
        for c, n in share.items():
            assert abs(counts[c] - n / 5) < 1, (c, counts)
    # seeded: the same plan again, another seed another plan
    assert all(np.array_equal(a, b) for a, b in zip(folds, cv.plan_folds(labels, 5, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, cv.plan_folds(labels, 5, seed=4)))


def test_fold_split_is_the_planned_fold_and_its_complement():
    split = Split([f"img{i}.jpg" for i in range(20)], [0] * 12 + [1] * 8)
    folds = cv.plan_folds(split.labels, 4, seed=0)
    for k in range(1, 5):
        tr, va = cv.fold_split(split, 4, k, seed=0)
        assert va.paths == [split.paths[i] for i in folds[k - 1]]
        assert set(tr.paths).isdisjoint(va.paths) and len(tr) + len(va) == 20


def test_too_small_class_is_a_clear_error():
    with pytest.raises(DatasetError, match="smallest class has 2"):
        cv.plan_folds([0] * 10 + [1] * 2, 3, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        cv.plan_folds([0, 1] * 5, 1, seed=0)


def _cfg(data, out, **extra):
    values = dict(
        data=str(data),
        out=str(out),
        backbone="resnet18",
        pretrained=False,
        image_size=32,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        freeze_stem=False,
    )
    values.update(extra)
    return build_config(None, **values)


def test_cv_runs_folds_skips_finished_ones_and_resumes_an_interrupted_fold(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_train=6, n_test=2)
    out = tmp_path / "cv"
    result = cv.run_cv(_cfg(data, out), n_folds=2, log=lambda s: None, progress=False)

    assert result["complete"] and result["finished_folds"] == [1, 2]
    planned = cv.plan_folds([0] * 6 + [1] * 6, 2, seed=42)
    for row, fold in zip(result["per_fold"], planned):
        assert row["n_val"] == len(fold) and row["n_train"] == 12 - len(fold)
        assert (out / f"fold_{row['fold']}" / "best_model.pth").is_file()
        assert (out / f"fold_{row['fold']}" / "report.html").is_file()
    accs = [r["val_accuracy"] for r in result["per_fold"]]
    assert result["summary"]["val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert result["summary"]["val_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    saved = json.loads((out / "cv_results.json").read_text())
    assert saved["per_fold"] == result["per_fold"]
    with open(out / "cv_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows] == ["1", "2", "mean", "std"]
    assert float(rows[2]["val_accuracy"]) == pytest.approx(np.mean(accs))

    # rerun: both folds are finished, nothing is trained
    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(training, "train", no_training)
    again = cv.run_cv(_cfg(data, out), n_folds=2, log=lambda s: None, progress=False)
    assert again["per_fold"] == result["per_fold"]

    # fold 2 "interrupted" (its result file missing): it continues from its checkpoint
    (out / "fold_2" / cv.RESULT).unlink()
    calls = []
    monkeypatch.undo()  # the real training again

    def spy(cfg, state=None, **kwargs):
        calls.append((cfg.cv_fold, state is not None))
        return spy.real(cfg, state, **kwargs)

    spy.real = training.train
    monkeypatch.setattr(training, "train", spy)
    resumed = cv.run_cv(_cfg(data, out), n_folds=2, log=lambda s: None, progress=False)
    assert calls == [(2, True)]
    assert resumed["complete"] and resumed["per_fold"][0] == result["per_fold"][0]

    # other options on the same folder are refused, not silently mixed
    with pytest.raises(ValueError, match="different options"):
        cv.run_cv(_cfg(data, out, lr=0.5), n_folds=2, log=lambda s: None, progress=False)


def _fake_summary(n_val: int) -> dict:
    per = {"pria": {"recall": 0.5}, "wanita": {"recall": 1.0}}
    return {
        "best_epoch": 1,
        "epochs_run": 1,
        "temperature": 1.0,
        "validation": {"n": n_val, "accuracy": 0.75, "per_class": per, "ece": 0.1},
        "test": {"n": 4, "accuracy": 0.5, "per_class": per},
    }


def test_time_budget_stops_starting_new_folds(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n_train=6, n_test=2)
    trained = []

    def fake_train(cfg, state=None, **kwargs):
        trained.append(cfg.cv_fold)
        return _fake_summary(4)

    class Clock:  # every reading is one minute after the previous one
        t = 0.0

        def monotonic(self):
            Clock.t += 60.0
            return Clock.t

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(cv, "time", Clock())
    result = cv.run_cv(_cfg(data, tmp_path / "cv"), n_folds=3, time_budget_min=2.5, log=lambda s: None, progress=False)
    assert trained == [1]  # fold 2 would start 3 minutes in
    assert not result["complete"] and result["missing_folds"] == [2, 3] and result["stopped_by_time_budget"]
    # the next run continues with the missing folds only
    result = cv.run_cv(_cfg(data, tmp_path / "cv"), n_folds=3, log=lambda s: None, progress=False)
    assert trained == [1, 2, 3] and result["complete"]
    assert result["summary"]["val_recall"]["pria"] == {"mean": 0.5, "std": 0.0, "n": 3}


def test_cli_cv_takes_train_options(tmp_path, monkeypatch, capsys):
    from facegender.app.cli import main

    data = make_dataset(tmp_path / "data", n_train=6, n_test=2)
    seen = []

    def fake_train(cfg, state=None, **kwargs):
        seen.append(cfg)
        return _fake_summary(4)

    monkeypatch.setattr(training, "train", fake_train)
    code = main(
        [
            "cv",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "cv"),
            "--folds",
            "3",
            "--lr",
            "0.02",
            "--backbone",
            "resnet18",
            "--no-pretrained",
            "--quiet",
        ]
    )
    assert code == 0
    assert [c.cv_fold for c in seen] == [1, 2, 3] and {c.lr for c in seen} == {0.02}
    assert {c.cv_folds for c in seen} == {3}
    assert "0.7500 ± 0.0000" in capsys.readouterr().out
    assert main(["cv", "--data", str(data), "--val-on-test"]) == 3
