"""A brief real run on ../shared/datasets/faces-dev: pretrained EfficientNet-Lite0, report recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_path

from facegender.app.predict import Predictor
from facegender.evaluation.evaluate import evaluate_model
from facegender.training.config import build_config
from facegender.training.train import train


@pytest.mark.slow
def test_faces_dev_brief_training_then_evaluate_and_predict_agree(tmp_path):
    data = shared_path("datasets", "faces-dev")
    cfg = build_config(None, data=str(data), out=str(tmp_path / "out"), epochs=2, image_size=160)
    summary = train(cfg, log=lambda s: None, progress=False)
    # Two short epochs at 160 px from ImageNet weights: far above chance on 200 test faces
    # (measured 0.705; chance would exceed 0.62 with probability < 0.1%).
    assert summary["test"]["n"] == 200
    assert summary["test"]["accuracy"] >= 0.65

    model = tmp_path / "out" / "best_model.pth"
    metrics = evaluate_model(str(model), str(data / "test"), log=lambda s: None, progress=False)
    assert metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)

    results = Predictor.from_file(model).predict_paths([data / "test"])
    assert len(results) == 200
    correct = sum(Path(r.file).parent.name == r.faces[0].label for r in results)
    assert correct / 200 == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]["accuracy"] == metrics["accuracy"]
