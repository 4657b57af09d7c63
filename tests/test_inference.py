"""The inference core and the Python API: one Model for every command, the same probabilities from
`evaluate` and `predict`, streaming prediction in input order, no torch at `import facegender`."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, make_dataset
from PIL import Image

from facegender.evaluation.predictions import predict_labelled


def test_import_facegender_loads_no_torch():
    code = (
        "import sys, facegender; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert {'train', 'load', 'Model', 'TrainRun'} <= set(dir(facegender)); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_evaluate_and_predict_give_the_same_probability(trained_run, tmp_path):
    """predictions.csv of `evaluate` and `predict --csv`/the Python API agree to 1e-5 per file."""
    import facegender
    from facegender.app.cli import main

    model_path = trained_run / "out" / "best_model.pth"
    test_dir = trained_run / "data" / "test"
    assert (
        main(["evaluate", "--model", str(model_path), "--data", str(test_dir), "--out", str(tmp_path), "--quiet"]) == 0
    )
    with open(tmp_path / "predictions.csv", newline="") as f:
        evaluated = {row["path"]: float(row["p_wanita"]) for row in csv.DictReader(f)}
    predicted = {
        r.file: r.faces[0].probabilities["wanita"]
        for r in facegender.load(model_path).predict(sorted(evaluated), batch_size=5)
    }
    assert len(evaluated) == len(predicted) == 16
    for path, p in evaluated.items():
        assert predicted[path] == pytest.approx(p, abs=1e-5), path


def test_final_test_evaluation_matches_evaluate(trained_run):
    """train's test metrics (one inference at the end of training) are evaluate's."""
    import json

    import facegender

    model = facegender.load(trained_run / "out" / "best_model.pth")
    pred = predict_labelled(model, trained_run / "data" / "test", log=lambda s: None, progress=False)
    from facegender.evaluation.evaluate import compute_metrics

    metrics = compute_metrics(pred.logits, pred.labels, pred.classes, pred.temperature)
    recorded = json.loads((trained_run / "out" / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == recorded["accuracy"]
    assert metrics["loss_calibrated"] == pytest.approx(recorded["loss_calibrated"], abs=1e-5)


def test_streaming_predict_keeps_order_and_errors_in_place(trained_run, tmp_path):
    import facegender

    model = facegender.load(trained_run / "out" / "best_model.pth")
    good = sorted((trained_run / "data" / "test").rglob("*.jpg"))[:5]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    items = [
        good[0],
        tmp_path / "broken.jpg",
        good[1],
        tmp_path / "missing.png",
        Image.open(good[2]),
        good[3].read_bytes(),
        ("named.jpg", good[4]),
    ]
    chunks, read = [], []
    finish, prepare = model._finish, model._prepare

    def spy_finish(prepared):
        chunks.append((len(prepared), len(read)))
        return finish(prepared)

    def spy_prepare(source, max_pixels):
        read.append(source)
        return prepare(source, max_pixels)

    model._finish, model._prepare = spy_finish, spy_prepare
    results = list(model.predict_iter(items, batch_size=2))
    assert [n for n, _ in chunks] == [2, 2, 2, 1], "faces are classified a batch at a time"
    assert all(n_read <= 2 * 2 * (i + 1) for i, (_, n_read) in enumerate(chunks)), (
        "images are read at most one batch ahead of the classifier, not all first"
    )
    assert [r.status for r in results] == ["ok", "error", "ok", "error", "ok", "ok", "ok"]
    assert results[0].file == str(good[0]) and results[2].file == str(good[1])
    assert results[6].file == "named.jpg" and "broken.jpg" in results[1].error
    # the same image gives the same answer whichever way it came in and whatever its batch
    alone = model.predict(good[1])[0].faces[0].probabilities
    assert results[2].faces[0].probabilities == pytest.approx(alone, abs=1e-5)
    single = model.predict([good[3]])[0].faces[0].probability
    assert results[5].faces[0].probability == pytest.approx(single, abs=1e-5)


def test_one_temperature_softmax_and_tta(trained_run):
    import facegender
    from facegender.core.decision import apply_temperature

    model = facegender.load(trained_run / "out" / "best_model.pth", tta=True)
    batch = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    plain, mirrored = model.logit_views(batch)
    np.testing.assert_allclose(model.logits(batch), (plain + mirrored) / 2, rtol=1e-6)
    np.testing.assert_allclose(mirrored, model.logits(batch[..., ::-1].copy(), tta=False), atol=1e-4)
    np.testing.assert_allclose(model.probabilities(plain), apply_temperature(plain, model.temperature))


def test_predict_on_an_empty_folder_says_so(trained_run, tmp_path, capsys):
    from facegender.app.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["predict", "--model", str(trained_run / "out" / "best_model.pth"), str(tmp_path / "empty")])
    assert code == 3 and "no images found in" in capsys.readouterr().err


def test_default_model_is_the_bundled_one(monkeypatch):
    """`facegender.load()` without a path goes through `default_model_path` (bundle.py)."""
    import facegender
    from facegender.core import model as inference

    def missing():
        raise FileNotFoundError("the bundled default model is missing")

    monkeypatch.setattr(inference, "default_model_path", missing)
    with pytest.raises(FileNotFoundError, match="bundled default model"):
        facegender.load()


def test_python_api_end_to_end(tmp_path):
    """The README's example: train on a tiny dataset, load the model, predict."""
    import facegender

    data = make_dataset(tmp_path / "data", n_train=8, n_test=4)
    run = facegender.train(
        data,
        preset="plain",
        out=tmp_path / "run",
        backbone="resnet18",
        pretrained=False,
        image_size=48,
        epochs=1,
        batch_size=8,
        freeze_stem=False,
        log=lambda s: None,
        progress=False,
    )
    assert run.model_path == tmp_path / "run" / "best_model.pth" and run.model_path.is_file()
    assert run.metrics["test"]["n"] == 8 and 0 <= run.metrics["test"]["accuracy"] <= 1
    model = facegender.load(run.model_path)
    [result] = model.predict([next((data / "test" / "pria").glob("*.jpg"))])
    assert result.status == "ok" and result.faces[0].label in ("pria", "wanita")
    from facegender.training.train import TrainRun

    assert isinstance(run, TrainRun)


def test_model_options_refuse_checkpoints_and_other_files(trained_run, tmp_path, capsys):
    """gender_checkpoint.pth and foreign files get facegender's own message, never PyTorch's advice."""
    import argparse

    import torch

    from facegender.app.cli import main

    image = str(next((trained_run / "data" / "test").rglob("*.jpg")))
    torch.save({"config": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk" * 10)
    for model, expected in (
        (trained_run / "out" / "gender_checkpoint.pth", "best_model.pth"),
        (tmp_path / "pickled.pth", "not a facegender model file"),
        (tmp_path / "junk.pth", "cannot be read as a facegender model"),
    ):
        assert main(["predict", "--model", str(model), image]) == 4
        err = capsys.readouterr().err
        assert expected in err and "weights_only" not in err, err


def test_usage_errors_name_the_closest_option(capsys):
    from facegender.app.cli import main

    for argv, expected in (
        (["predict", "--modle", "m.pth", "a.jpg"], "did you mean --model?"),
        (["train", "--epoch", "2", "--data", "d"], "did you mean --epochs?"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_train_options_come_from_the_config(capsys):
    """Every TrainConfig option, its default shown once, and what a preset changes."""
    import dataclasses

    from facegender.app.cli import build_parser
    from facegender.training.config import TrainConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli"):
            assert "--" + f.name.replace("_", "-") in text
    assert (
        text.count("(default: 0.001; --preset report 0.0001, imagenet 0.0003, frozen 0.01, plain 0.0001)") == 1
    )  # --lr
    assert "None" not in text
    args = build_parser().parse_args(["train", "--data", "d", "--lr", "0.5", "--no-cache"])
    assert args.lr == 0.5 and args.cache is False and args.epochs is None  # not given: the preset's or default
