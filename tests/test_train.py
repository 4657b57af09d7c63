"""End to end on synthetic images: outputs, checkpoints, resume, Ctrl-C, evaluate vs predict, CLI."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from facegender.app.cli import main as cli_main
from facegender.app.predict import Predictor
from facegender.core import files
from facegender.evaluation.evaluate import evaluate_model
from facegender.training import checkpoint as ckpt
from facegender.training.config import PRESETS, build_config
from facegender.training.engine import EarlyStopping
from facegender.training.train import TrainingInterrupted, resume_config, train

OUTPUTS = [
    "best_model.pth",
    "gender_checkpoint.pth",
    "summary.csv",
    "config.yaml",
    "loss_curve.png",
    "accuracy_curve.png",
    "confusion_matrix.png",
    "metrics.json",
]


def small_config(data: Path, out: Path, **kw):
    values = dict(
        data=str(data),
        out=str(out),
        backbone="resnet18",
        pretrained=False,
        image_size=48,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        freeze_stem=False,
    )
    values.update(kw)
    return build_config(None, **values)


def test_training_writes_every_output_as_plain_data(trained_run):
    out = trained_run / "out"
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    best = torch.load(out / "best_model.pth", weights_only=True)
    state = torch.load(out / "gender_checkpoint.pth", weights_only=True)
    assert best["classes"] == ["pria", "wanita"] and best["backbone"] == "resnet18"
    assert best["pretrained"] is False and best["preprocessing"]["image_size"] == 64
    assert best["temperature"] > 0 and "val" in best["metrics"] and "test" in best["metrics"]
    assert {"optimizer_state", "history", "config", "rng_state", "early_stopping", "epoch"} <= set(state)
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[0]["train_loss"]) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16 and 0 <= metrics["test"]["accuracy"] <= 1


def test_learnable_data_is_learned(tmp_path):
    """Stripes of two orientations: a short run must beat chance clearly on the untouched test split."""
    data = make_dataset(tmp_path / "d", n_train=24, n_test=10)
    summary = train(small_config(data, tmp_path / "o", epochs=4, augment="none"), log=lambda s: None, progress=False)
    assert summary["test"]["accuracy"] >= 0.8


def test_evaluate_and_predict_agree_with_training(trained_run):
    model_path = trained_run / "out" / "best_model.pth"
    metrics = evaluate_model(str(model_path), str(trained_run / "data" / "test"), log=lambda s: None, progress=False)
    recorded = json.loads((trained_run / "out" / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"])
    predictor = Predictor.from_file(model_path)
    results = predictor.predict_paths([trained_run / "data" / "test"])
    assert len(results) == 16 and all(len(r.faces) == 1 for r in results)
    correct = sum(Path(r.file).parent.name == r.faces[0].label for r in results)
    assert correct / 16 == pytest.approx(metrics["accuracy"])
    probs = [r.faces[0].probabilities for r in results]
    assert all(abs(sum(p.values()) - 1) < 1e-4 for p in probs)


def test_resume_continues_with_the_same_history(tmp_path):
    data = make_dataset(tmp_path / "d", n_train=8, n_test=4)
    out = tmp_path / "o"
    train(small_config(data, out, epochs=1, patience=5), log=lambda s: None, progress=False)
    first = torch.load(out / "gender_checkpoint.pth", weights_only=True)
    cfg, state = resume_config(str(out / "gender_checkpoint.pth"), epochs=3)
    assert cfg.epochs == 3 and cfg.out == str(out)
    train(cfg, state, log=lambda s: None, progress=False)
    after = torch.load(out / "gender_checkpoint.pth", weights_only=True)
    assert [r["epoch"] for r in after["history"]] == [1, 2, 3]
    assert after["history"][0] == first["history"][0]
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 3


def test_ctrl_c_mid_epoch_keeps_the_last_finished_epoch(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "d", n_train=8, n_test=4)
    out = tmp_path / "o"
    import facegender.training.train as T

    real = T.train_one_epoch
    calls = {"n": 0}

    def interrupt_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "train_one_epoch", interrupt_second_epoch)
    messages = []
    with pytest.raises(TrainingInterrupted):
        train(small_config(data, out, epochs=3, patience=5), log=messages.append, progress=False)
    assert any("--resume" in m for m in messages)
    state = torch.load(out / "gender_checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    assert torch.load(out / "best_model.pth", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*tmp"))
    monkeypatch.setattr(T, "train_one_epoch", real)
    cfg, state = resume_config(str(out / "gender_checkpoint.pth"))
    train(cfg, state, log=lambda s: None, progress=False)
    assert [r["epoch"] for r in torch.load(out / "gender_checkpoint.pth", weights_only=True)["history"]] == [1, 2, 3]


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "gender_checkpoint.pth"
    ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": 1}, path)

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_file(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        written = files.write_text_atomic("<html></html>", tmp_path / "report.html")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    # mkstemp creates 0600 files; a report others should read must come out like any new file.
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_checkpoint_round_trip_and_bad_files(trained_run, tmp_path):
    model, record = ckpt.load_model(trained_run / "out" / "best_model.pth")
    state = torch.load(trained_run / "out" / "best_model.pth", weights_only=True)["model_state"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ckpt.CheckpointError, match="junk.pth"):
        ckpt.load_model(tmp_path / "junk.pth")
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_model(tmp_path / "missing.pth")
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a facegender model"):
        ckpt.load_model(tmp_path / "other.pth")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_early_stopping_counts_epochs_without_improvement():
    acc = EarlyStopping(patience=2, mode="max")
    assert acc.step(0.5, 1) and not acc.step(0.5, 2) and acc.step(0.6, 3)
    assert not acc.step(0.55, 4) and not acc.should_stop and not acc.step(0.6, 5) and acc.should_stop
    assert acc.best_epoch == 3
    loss = EarlyStopping(patience=1, mode="min")
    assert loss.step(1.0, 1) and loss.step(0.9, 2) and not loss.step(0.95, 3) and loss.should_stop
    restored = EarlyStopping()
    restored.load_state_dict(loss.state_dict())
    assert restored.should_stop and restored.best == 0.9


def test_presets_and_explicit_flags():
    report = build_config("report", data="d")
    assert report.backbone == "resnet18" and report.val_on_test and report.lr == 1e-4 and report.batch_size == 32
    assert build_config("report", data="d", backbone="efficientnet_lite0").backbone == "efficientnet_lite0"
    assert build_config(None, data="d").backbone == "efficientnet_lite0"
    assert set(PRESETS) >= {"report", "best"}
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("fastest")
    with pytest.raises(ValueError, match="--monitor"):
        build_config(None, monitor="val_f1")


def test_cli_predict_reports_bad_files_and_goes_on(trained_run, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = next((trained_run / "data" / "test" / "pria").iterdir())
    code = cli_main(["predict", "--model", str(trained_run / "out" / "best_model.pth"), str(bad), str(good), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out[0]["status"] == "error" and "broken.jpg" in out[0]["error"]
    assert out[1]["status"] == "ok" and out[1]["faces"][0]["label"] in ("pria", "wanita")


def test_cli_train_errors_are_one_clear_message(tmp_path, capsys):
    code = cli_main(["train", "--data", str(tmp_path / "nowhere"), "--quiet"])
    assert code == 3
    assert "dataset folder not found" in capsys.readouterr().err


def test_predict_keeps_same_named_uploads_apart(trained_run):
    predictor = Predictor.from_file(trained_run / "out" / "best_model.pth")
    good = next((trained_run / "data" / "test" / "pria").iterdir()).read_bytes()
    results = predictor.predict_sources([("photo.jpg", good), ("photo.jpg", b"junk"), ("photo.jpg", good)])
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert "BytesIO" not in results[1].error and "photo.jpg" in results[1].error


def test_validation_metrics_are_fp32_whatever_the_training_precision(tmp_path, monkeypatch):
    """bf16 autocast (the default on CPUs with AMX) trains; the metrics that choose the best epoch
    are computed in fp32, so they do not depend on the CPU model."""
    from facegender.training import distributed
    from facegender.training.config import build_config
    from facegender.training.train import train

    seen = []
    evaluate = distributed.evaluate
    monkeypatch.setattr(distributed, "evaluate", lambda *a, **k: seen.append(a[4]) or evaluate(*a, **k))
    data = make_dataset(tmp_path / "data", n_train=6, n_test=2)
    cfg = build_config(
        None,
        data=str(data),
        out=str(tmp_path / "out"),
        backbone="resnet18",
        pretrained=False,
        image_size=32,
        epochs=2,
        batch_size=4,
        precision="bf16",
    )
    train(cfg, log=lambda s: None, progress=False)
    assert seen == ["fp32", "fp32"]
