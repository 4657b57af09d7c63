"""The decision threshold: `metrics.equal_recall_threshold` (chosen on validation), the one decision
`Model.decide` used by predict, evaluate and serve, `--threshold`, the `uncertain` flag, and the
threshold carried through ONNX metadata.

The models are small ONNX files made here with `onnx.helper` (as in test_light.py): the logits of
classes ("blue", "red") are 4x the mean blue and the mean red of the image, so a plain-coloured
image with red R and blue B gets p(red) = sigmoid(4 (R - B) / 255).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from facegender.evaluation.predictions import predict_labelled
from facegender.training.export import export_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CLASSES = ["blue", "red"]


def p_red(rgb) -> float:
    return 1 / (1 + math.exp(-4 * (rgb[0] - rgb[2]) / 255))


#: p(red) 0.578: red by the arg-max, blue at a threshold of 0.6.
REDDISH = (140, 90, 120)
#: p(red) 0.925 and 0.075: clear either way.
RED, BLUE = (200, 30, 40), (40, 30, 200)


def colour_model(path, **record_extra):
    """test_light's colour classifier (classes blue, red) at 8 px, with `record_extra` in its metadata."""
    from test_light import colour_model as make

    return make(path, size=8, **record_extra)


def image(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), rgb).save(path)
    return path


def probs_of(p1) -> np.ndarray:
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], axis=1)


def recalls(probs, labels, t) -> tuple[float, float]:
    from facegender.core.decision import decide

    preds, labels = decide(probs, t), np.asarray(labels)
    return float((preds[labels == 0] == 0).mean()), float((preds[labels == 1] == 1).mean())


# ----------------------------------------------------------------------------- equal_recall_threshold


def test_equal_recall_threshold_makes_the_recalls_equal():
    """At 0.5 class 0 has recall 2/4 and class 1 4/4; only thresholds in (0.7, 0.75] balance them
    (3/4 each), and the one closest to 0.5 is just above 0.7."""
    from facegender.evaluation.metrics import equal_recall_threshold

    probs = probs_of([0.1, 0.2, 0.6, 0.75, 0.7, 0.8, 0.9, 0.95])
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    assert recalls(probs, labels, 0.5) == (0.5, 1.0)
    t = equal_recall_threshold(probs, labels)
    assert 0.7 < t <= 0.75 and t == pytest.approx(0.7)
    assert recalls(probs, labels, t) == (0.75, 0.75)


def test_equal_recall_threshold_is_the_best_on_a_grid():
    """On random scores no threshold of a fine grid gives a smaller recall gap, and none with the
    same gap is closer to 0.5."""
    from facegender.evaluation.metrics import equal_recall_threshold

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    p1 = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.001, 0.999).round(3)
    probs = probs_of(p1)
    t = equal_recall_threshold(probs, labels)
    gap = abs(np.subtract(*recalls(probs, labels, t)))
    for g in np.linspace(0.0005, 0.9995, 1000):
        other = abs(np.subtract(*recalls(probs, labels, g)))
        assert other >= gap - 1e-12
        if other <= gap + 1e-12:
            assert abs(t - 0.5) <= abs(g - 0.5) + 1e-12


def test_equal_recall_threshold_keeps_half_when_it_is_as_good():
    """Perfectly separated at 0.5: every threshold in (0.3, 0.7] gives recall 1 and 1; 0.5 stays."""
    from facegender.evaluation.metrics import equal_recall_threshold

    probs, labels = probs_of([0.1, 0.3, 0.7, 0.9]), [0, 0, 1, 1]
    assert equal_recall_threshold(probs, labels) == 0.5
    # a shift below 0.5: the equal-recall interval is (0.2, 0.4], and 0.4 is its point closest to 0.5
    probs, labels = probs_of([0.1, 0.2, 0.4, 0.45]), [0, 0, 1, 1]
    assert equal_recall_threshold(probs, labels) == pytest.approx(0.4)
    assert recalls(probs, labels, 0.4) == (1.0, 1.0)


def test_equal_recall_threshold_without_one_class_is_half():
    from facegender.evaluation.metrics import equal_recall_threshold

    assert equal_recall_threshold(probs_of([0.9, 0.8, 0.7]), [1, 1, 1]) == 0.5
    assert equal_recall_threshold(probs_of([0.1, 0.95]), [0, 0]) == 0.5
    assert equal_recall_threshold(np.zeros((0, 2)), np.zeros(0, int)) == 0.5
    with pytest.raises(ValueError, match="two classes"):
        equal_recall_threshold(np.full((2, 3), 1 / 3), [0, 1])


def test_decide_and_the_uncertain_band():
    from facegender.core.decision import decide, uncertain_mask

    probs = probs_of([0.3, 0.55, 0.62, 0.9])
    assert decide(probs).tolist() == [0, 1, 1, 1]
    assert decide(probs, 0.6).tolist() == [0, 0, 1, 1]
    assert uncertain_mask(probs).tolist() == [False, True, True, False]  # |p - 0.5| < 0.15
    assert uncertain_mask(probs, 0.6).tolist() == [False, True, True, False]  # |p - 0.6| < 0.15
    assert uncertain_mask(probs, 0.8, band=0.2).tolist() == [False, False, True, True]
    three = np.array([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    assert decide(three, 0.9).tolist() == [0, 0, 2]  # threshold ignored
    assert uncertain_mask(three).tolist() == [True, False, False]  # top < 0.65


# ----------------------------------------------------------------------------- the model


def test_a_stored_threshold_changes_the_label_at_the_boundary(tmp_path):
    """The record's threshold (0.6) labels a p(red) 0.578 face blue, where the arg-max says red;
    `probability` is then that of blue (below 0.5), and the face is uncertain (within 0.15)."""
    import facegender

    model_path = colour_model(tmp_path / "m.onnx", threshold=0.6)
    photo = image(tmp_path / "reddish.png", REDDISH)
    model = facegender.load(model_path)
    assert model.threshold == 0.6 and model.uncertain_band == 0.15
    face = model.predict(photo)[0].faces[0]
    assert face.label == face.predicted_class == "blue"
    assert face.probability == pytest.approx(1 - p_red(REDDISH), abs=1e-4) and face.probability < 0.5
    assert face.probabilities["red"] == pytest.approx(p_red(REDDISH), abs=1e-4)
    assert face.uncertain is True

    plain = facegender.load(model_path, threshold=0.5).predict(photo)[0].faces[0]
    assert plain.label == "red" and plain.probability == pytest.approx(p_red(REDDISH), abs=1e-4)
    assert facegender.load(model_path, threshold=None).predict(photo)[0].faces[0].label == "red"
    assert model.replace(threshold=0.55).predict(photo)[0].faces[0].label == "red"
    with pytest.raises(ValueError, match="between 0 and 1"):
        model.replace(threshold=1.0)


def test_records_without_a_threshold_take_the_arg_max(tmp_path):
    import facegender

    model = facegender.load(colour_model(tmp_path / "m.onnx"))
    assert model.threshold is None
    probs = probs_of([0.45, 0.55])
    assert model.decide(probs).tolist() == [0, 1]


def test_the_uncertain_flag_follows_the_band(tmp_path):
    """Red (p 0.925) is outside the band around 0.6, reddish (0.578) inside; a record band of 0.01
    leaves reddish outside too. --min-confidence still replaces the label."""
    import facegender

    photos = [image(tmp_path / "red.png", RED), image(tmp_path / "reddish.png", REDDISH)]
    model = facegender.load(colour_model(tmp_path / "m.onnx", threshold=0.6))
    flags = [r.faces[0].uncertain for r in model.predict(photos)]
    assert flags == [False, True]
    narrow = facegender.load(colour_model(tmp_path / "n.onnx", threshold=0.6, uncertain_band=0.01))
    assert narrow.uncertain_band == 0.01
    assert [r.faces[0].uncertain for r in narrow.predict(photos)] == [False, False]
    gated = model.replace(min_confidence=0.8).predict(photos)
    assert [r.faces[0].label for r in gated] == ["red", "uncertain"]
    assert gated[1].faces[0].predicted_class == "blue"


# ----------------------------------------------------------------------------- the commands


def test_predict_threshold_option(tmp_path, capsys):
    from facegender.app.cli import main

    model = str(colour_model(tmp_path / "m.onnx"))
    photo = str(image(tmp_path / "reddish.png", REDDISH))
    assert main(["predict", "--model", model, "--json", photo]) == 0
    (face,) = json.loads(capsys.readouterr().out)[0]["faces"]
    assert face["label"] == "red" and face["uncertain"] is True
    assert main(["predict", "--model", model, "--json", "--threshold", "0.6", photo]) == 0
    (face,) = json.loads(capsys.readouterr().out)[0]["faces"]
    assert face["label"] == "blue" and face["probability"] < 0.5
    assert main(["predict", "--model", model, "--csv", "--threshold", "0.6", photo]) == 0
    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert row["label"] == "blue" and row["uncertain"] == "true"
    for bad in ("0", "1", "1.5", "-0.2", "half"):
        with pytest.raises(SystemExit) as exc:
            main(["predict", "--model", model, "--threshold", bad, photo])
        assert exc.value.code == 2
        assert "between 0 and 1" in capsys.readouterr().err


@pytest.fixture()
def labelled(tmp_path):
    """Three red, two reddish (p 0.578) and three blue images, all labelled by their colour."""
    for name, rgb, label, count in (("r", RED, "red", 3), ("rr", REDDISH, "red", 2), ("b", BLUE, "blue", 3)):
        for i in range(count):
            image(tmp_path / "data" / label / f"{name}{i}.png", rgb)
    return tmp_path / "data"


def test_evaluate_threshold_changes_the_metrics(tmp_path, labelled):
    """At 0.5 all 8 are right; at 0.6 the two reddish red images become blue: accuracy 6/8, recall of
    red 3/5, and metrics.json and predictions.csv say so."""
    from facegender.app.cli import main

    model = str(colour_model(tmp_path / "m.onnx"))
    assert main(["evaluate", "--model", model, "--data", str(labelled), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    plain = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert plain["accuracy"] == 1.0 and plain["threshold"] is None
    assert (
        main(
            [
                "evaluate",
                "--model",
                model,
                "--data",
                str(labelled),
                "--out",
                str(tmp_path / "b"),
                "--threshold",
                "0.6",
                "--min-confidence",
                "0.3",
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["threshold"] == 0.6 and m["accuracy"] == 0.75
    assert m["per_class"]["red"]["recall"] == pytest.approx(0.6) and m["per_class"]["blue"]["recall"] == 1.0
    assert m["confusion_matrix"] == [[3, 0], [2, 3]]
    assert m["selective"]["accuracy_on_covered"] == 0.75  # every prediction has p >= 0.3
    assert m["ece_calibrated"] == pytest.approx(plain["ece_calibrated"])  # calibration reads the probabilities
    with open(tmp_path / "b" / "predictions.csv", newline="") as f:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert rows["rr0.png"]["predicted"] == "blue"
    assert float(rows["rr0.png"]["probability"]) == pytest.approx(1 - p_red(REDDISH), abs=1e-5)
    assert rows["r0.png"]["predicted"] == "red"


def test_analysis_uses_the_threshold_of_the_predictions(labelled):
    """Groups, coverage and mistakes read the same decision as accuracy."""
    import facegender
    from facegender.evaluation.evaluate import analyse, mistakes

    model = facegender.load(colour_model(labelled.parent / "m.onnx", threshold=0.6), detect=False)
    pred = predict_labelled(model, labelled, log=lambda s: None, progress=False)
    assert pred.threshold == 0.6
    groups = {"shade": ["light" if "rr" in str(p) else "strong" for p in pred.paths]}
    m = analyse(pred, groups, min_group_size=1)
    assert m["accuracy"] == 0.75 and m["groups"]["shade"]["groups"]["light"]["accuracy"] == 0.0
    assert m["coverage_curve"][0]["accuracy"] == 0.75
    wrong = mistakes(pred)
    assert len(wrong) == 2 and all(w["predicted"] == "blue" and w["true"] == "red" for w in wrong)


def test_serve_threshold_option_and_query(tmp_path):
    from fastapi.testclient import TestClient

    from facegender.app.serve import create_app

    model = colour_model(tmp_path / "m.onnx")
    data = image(tmp_path / "reddish.png", REDDISH).read_bytes()
    files = {"files": ("reddish.png", data, "image/png")}

    def label(client, **params):
        reply = client.post("/predict", files=files, params=params)
        assert reply.status_code == 200, reply.text
        return reply.json()["results"][0]["faces"][0]["label"]

    plain = TestClient(create_app(model, threads=1))
    assert label(plain) == "red" and label(plain, threshold=0.6) == "blue"
    assert plain.get("/model").json()["threshold"] is None
    assert plain.post("/predict", files=files, params={"threshold": 1.2}).status_code == 422
    shifted = TestClient(create_app(model, threads=1, threshold=0.6))
    assert label(shifted) == "blue" and label(shifted, threshold=0.5) == "red"
    assert shifted.get("/model").json()["threshold"] == 0.6


# ----------------------------------------------------------------------------- ONNX


def test_onnx_metadata_carries_the_threshold():
    from facegender.core.onnx_model import onnx_metadata, read_metadata

    record = {"classes": CLASSES, "preprocessing": {"image_size": 8}, "threshold": 0.4321, "uncertain_band": 0.1}
    meta = read_metadata(onnx_metadata(record), "x.onnx")
    assert meta["threshold"] == 0.4321 and meta["uncertain_band"] == 0.1
    assert "threshold" not in read_metadata(onnx_metadata({"classes": CLASSES, "preprocessing": {}}), "x.onnx")


def test_exported_onnx_decides_like_the_pth_model(tmp_path):
    """export_model writes the record's threshold and band; the loaded .onnx decides the same."""
    torch = pytest.importorskip("torch")

    import facegender
    from facegender.core.model import Model
    from facegender.core.preprocessing import Preprocessing
    from facegender.training.torch_backend import TorchBackend

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    prep = Preprocessing(image_size=16)
    record = {
        "classes": CLASSES,
        "backbone": "tiny-test",
        "preprocessing": prep.to_dict(),
        "threshold": 0.37,
        "uncertain_band": 0.05,
    }
    model = Model(CLASSES, prep, TorchBackend(net), info=record, detect=False, threshold=0.37, uncertain_band=0.05)
    export_model(model, tmp_path / "m.onnx", parity_count=8, log=lambda s: None)
    onnx_model = facegender.load(tmp_path / "m.onnx", detect=False)
    assert onnx_model.threshold == 0.37 and onnx_model.uncertain_band == 0.05
    crops = np.random.default_rng(0).integers(0, 256, (32, 3, 16, 16), dtype=np.uint8)
    probs = onnx_model.classify(crops)
    assert onnx_model.decide(probs).tolist() == model.decide(model.classify(crops)).tolist()
    assert onnx_model.decide(probs).tolist() == (probs[:, 1] >= 0.37).astype(int).tolist()
