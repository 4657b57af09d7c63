"""ONNX export: the file checks, carries its metadata, matches PyTorch, and serves like a .pth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facegender.training.export import export_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`"),
]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """(model.onnx, best_model.pth, export report) of the session's small trained model, parity
    checked on its test images."""
    import facegender

    model = trained_run / "out" / "best_model.pth"
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_model(facegender.load(model, device="cpu"), out, data=trained_run / "data", log=lambda s: None)
    return out, model, report


def test_export_writes_a_valid_model_with_metadata(exported):
    import onnx

    from facegender.training import checkpoint as ckpt

    out, model_path, report = exported
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    record = ckpt.load_file(model_path)
    assert props["facegender_format"] == "facegender-onnx/1"
    assert json.loads(props["classes"]) == record["classes"] == ["pria", "wanita"]
    assert json.loads(props["preprocessing"]) == record["preprocessing"]
    assert json.loads(props["temperature"]) == pytest.approx(record["temperature"])
    assert json.loads(props["tta"]) is record["tta"]
    assert json.loads(props["backbone"]) == "resnet18"
    assert json.loads(props["metrics"]) == record["metrics"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value, "the batch size must be dynamic"
    assert report["parity_max_abs_diff"] <= 1e-3
    assert "images from" in report["parity_images"] and report["parity_images"].endswith("test")


def test_onnx_matches_pytorch_on_test_images(exported, trained_run):
    from facegender.app.predict import Predictor

    out, model_path, _ = exported
    images = sorted((trained_run / "data" / "test").rglob("*.jpg"))
    from_torch = Predictor.from_file(model_path, device="cpu").predict_paths(images)
    from_onnx = Predictor.from_file(out).predict_paths(images)
    assert len(from_onnx) == len(images) == 16
    diffs = []
    for a, b in zip(from_torch, from_onnx):
        assert a.faces[0].predicted_class == b.faces[0].predicted_class
        diffs += [abs(a.faces[0].probabilities[c] - b.faces[0].probabilities[c]) for c in ("pria", "wanita")]
    assert max(diffs) <= 1e-3


def test_load_onnx_classifier_runs_any_batch_size(exported):
    from facegender.core.onnx_model import load_onnx_classifier

    out, model_path, _ = exported
    logits_fn, meta = load_onnx_classifier(out, threads=1)
    assert meta["classes"] == ["pria", "wanita"] and meta["preprocessing"]["image_size"] == 64
    batch = torch.randn(5, 3, 64, 64)
    five = logits_fn(batch)
    assert five.shape == (5, 2) and five.dtype == np.float32
    np.testing.assert_allclose(logits_fn(batch[2:3]), five[2:3], atol=1e-4)  # batch 1 == row of batch 5
    np.testing.assert_allclose(logits_fn(batch.numpy()), five, atol=1e-6)  # numpy input too


def test_failed_parity_leaves_no_file(trained_run, tmp_path, capsys):
    from facegender.app.cli import main

    out = tmp_path / "model.onnx"
    code = main(
        [
            "export",
            "--model",
            str(trained_run / "out" / "best_model.pth"),
            "--out",
            str(out),
            "--tolerance",
            "-1",
            "--parity-images",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "parity check failed" in err and "was not written" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_other_suffix(trained_run, tmp_path):
    import facegender

    with pytest.raises(ValueError, match=r"\.onnx"):
        export_model(facegender.load(trained_run / "out" / "best_model.pth", device="cpu"), tmp_path / "model.pth")


def _plain_onnx(path, props: dict[str, str] | None = None):
    """A valid ONNX model (Identity) that `facegender export` did not make."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (props or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def test_foreign_or_damaged_onnx_files_are_refused(tmp_path):
    from facegender.core.onnx_model import load_onnx_classifier
    from facegender.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not found"):
        load_onnx_classifier(tmp_path / "missing.onnx")
    with pytest.raises(CheckpointError, match="facegender export"):
        load_onnx_classifier(_plain_onnx(tmp_path / "plain.onnx"))
    code = "__import__('os').system('echo hacked')"  # metadata is JSON, never evaluated
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_onnx_classifier(
            _plain_onnx(
                tmp_path / "evil.onnx",
                {"facegender_format": "facegender-onnx/1", "classes": code, "preprocessing": "{}"},
            )
        )
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_onnx_classifier(tmp_path / "junk.onnx")


def test_server_runs_the_onnx_model(exported, trained_run):
    from fastapi.testclient import TestClient

    from facegender.app.predict import Predictor
    from facegender.app.serve import create_app

    out, model_path, _ = exported
    image_path = sorted((trained_run / "data" / "test" / "wanita").glob("*.jpg"))[0]
    with TestClient(create_app(out)) as client:
        info = client.get("/model").json()
        assert info["runtime"] == "onnxruntime" and info["backbone"] == "resnet18" and info["file"] == "model.onnx"
        r = client.post("/predict", files={"files": (image_path.name, image_path.read_bytes(), "image/jpeg")})
    (result,) = r.json()["results"]
    (face,) = result["faces"]
    expected = Predictor.from_file(model_path, device="cpu").predict_paths([image_path])[0].faces[0]
    assert face["predicted_class"] == expected.predicted_class
    assert face["probability"] == pytest.approx(expected.probability, abs=1e-3)
    assert face["box"] == [0.0, 0.0, 48.0, 48.0]  # a model trained on crops: the whole image is the face
