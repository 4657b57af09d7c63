"""Prediction without PyTorch: an exported model predicts, evaluates and serves with onnxruntime,
numpy and Pillow alone.

Each test runs in a fresh interpreter where importing torch or torchvision fails (as when only
`pip install facegender` is installed) and checks at the end that neither was imported. The
models are small ONNX files made here with `onnx.helper`, with facegender's metadata: one
classifies a whole image by its mean colour (red or blue), one runs the face stage first.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_TORCH, run_without_torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "facegender" / "core" / "samples" / "astronaut.jpg"


def colour_model(path: Path, size: int = 16, face: dict | None = None, **record_extra) -> Path:
    """A facegender ONNX file whose logits are 4 x the mean red and the mean blue of the input
    (classes "blue", "red" -> class = the stronger colour); `record_extra` goes into its metadata
    (threshold, uncertain_band)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from facegender.core.onnx_model import onnx_metadata

    pick = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=np.float32)  # (R, G, B) -> (blue, red)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "pick"], ["score"]),
        helper.make_node("Mul", ["score", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(pick, "pick"), numpy_helper.from_array(np.array(4.0, np.float32), "gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    record = {
        "classes": ["blue", "red"],
        "backbone": "colour-test",
        "preprocessing": {"image_size": size, "mean": [0, 0, 0], "std": [1, 1, 1], "face": face},
        **record_extra,
    }
    for key, value in onnx_metadata(record).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def colour_data(tmp_path):
    model = colour_model(tmp_path / "colour.onnx")
    for cls, rgb in (("red", (200, 30, 40)), ("blue", (20, 40, 210))):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (30 + i, 20), rgb).save(tmp_path / "labelled" / cls / f"{cls}{i}.png")
    return model, tmp_path


def test_predict_with_an_onnx_model_imports_no_torch(colour_data):
    model, tmp = colour_data
    out = run_without_torch(
        f"""
        from facegender.app.cli import main
        code = main(["predict", "--model", {str(model)!r}, "--json", {str(tmp / "labelled")!r}])
        assert code == 0
    """,
        tmp,
    )
    results = json.loads(out[: out.rindex("NO-TORCH-OK")])
    assert len(results) == 6
    for r in results:
        assert r["faces"][0]["predicted_class"] == Path(r["file"]).parent.name


def test_evaluate_with_an_onnx_model_imports_no_torch(colour_data):
    model, tmp = colour_data
    run_without_torch(
        f"""
        import json
        from facegender.app.cli import main
        code = main(["evaluate", "--model", {str(model)!r}, "--data", {str(tmp / "labelled")!r},
                     "--out", {str(tmp / "eval")!r}, "--quiet"])
        assert code == 0
    """,
        tmp,
    )
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert '"accuracy": 1.0' in flat and '"n": 6' in flat
    assert (tmp / "eval" / "confusion_matrix.png").is_file()


def test_serve_with_an_onnx_model_imports_no_torch(colour_data):
    model, tmp = colour_data
    out = run_without_torch(
        f"""
        import io, json
        from fastapi.testclient import TestClient
        from facegender.app.serve import create_app
        client = TestClient(create_app({str(model)!r}, threads=1))
        files = [("files", (p.name, p.read_bytes(), "image/png"))
                 for p in sorted(__import__("pathlib").Path({str(tmp / "labelled")!r}).rglob("*.png"))]
        reply = client.post("/predict", files=files)
        assert reply.status_code == 200, reply.text
        print("REPLY", json.dumps(reply.json()))
        assert client.get("/health").status_code == 200
    """,
        tmp,
    )
    reply = json.loads(next(line for line in out.splitlines() if line.startswith("REPLY "))[6:])
    results = reply["results"] if isinstance(reply, dict) else reply
    assert len(results) == 6
    for r in results:
        assert r["faces"][0]["predicted_class"] == r["file"].rstrip("0123456789.png")


def test_the_face_stage_runs_without_torch(tmp_path):
    """A model with a face stage: RetinaFace finds the face in the sample photo, the crop is
    aligned and classified; all in numpy and onnxruntime."""
    model = colour_model(
        tmp_path / "faces.onnx",
        size=32,
        face={"size": 32, "template": "dlib", "pad_color": [0, 0, 0], "refine_steps": 1},
    )
    out = run_without_torch(
        f"""
        import json
        import facegender
        result = facegender.load({str(model)!r}).predict({str(SAMPLE)!r})[0]
        print("RESULT", json.dumps(result.to_dict()))
    """,
        tmp_path,
    )
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["status"] == "ok" and len(result["faces"]) == 1
    x1, y1, x2, y2 = result["faces"][0]["box"]
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200  # the astronaut's face (predict --sample prints it)


def test_the_bundled_model_predicts_without_torch(tmp_path):
    """The bundled model predicts with no PyTorch anywhere. A whole-network file (a fine-tuned
    body) needs nothing else: face_recognition_models is not imported and no dlib graph is built; a
    head-only file builds dlib's network as ONNX from that package's weight file (here into an
    empty cache)."""
    from facegender.core.model_card import is_head_only
    from facegender.core.resources import default_model_record

    head_only = is_head_only(default_model_record())
    if head_only and importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face_recognition_models (the head-only bundled model's face backbone) is not installed")
    out = run_without_torch(
        f"""
        import os
        os.environ["FACEGENDER_CACHE"] = {str(tmp_path / "cache")!r}
        from facegender.app.cli import main
        assert main(["predict", "--sample"]) == 0
        print("DLIB-PACKAGE-IMPORTED" if "face_recognition_models" in sys.modules else "NO-DLIB-PACKAGE")
    """,
        tmp_path,
    )
    assert "astronaut.jpg: face 1 at" in out and "female" in out
    built = list((tmp_path / "cache").glob("dlib_resnet_v1-*.onnx"))
    if head_only:
        assert built
    else:
        assert not built and "NO-DLIB-PACKAGE" in out


def test_training_without_torch_says_what_to_install(tmp_path):
    """`pip install facegender` has no PyTorch: commands that need it say which extra to install."""
    for cls in ("a", "b"):
        for split in ("train", "test"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "data" / split / cls / "x.png")
    program = BLOCK_TORCH + textwrap.dedent(f"""
        from facegender.app.cli import main
        code = main(["train", "--data", {str(tmp_path / "data")!r}, "--out", {str(tmp_path / "run")!r},
                     "--preset", "plain", "--epochs", "1"])
        print("EXIT", code)
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "EXIT 5" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install 'facegender[train]'" in proc.stderr and "torch" in proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("face_recognition_models") is None,
    reason="face_recognition_models (the bundled model's face backbone) is not installed",
)
def test_fast_is_no_refinement_and_no_tta(tmp_path):
    out = run_without_torch(
        """
        import contextlib, io, json
        from facegender.app.cli import main
        from facegender.app.serve import create_app

        def probabilities(*flags):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert main(["predict", "--sample", "--json", *flags]) == 0
            return [f["probabilities"] for r in json.loads(buf.getvalue()) for f in r["faces"]]

        fast = probabilities("--fast")
        assert fast == probabilities("--refine-steps", "0", "--no-tta"), "--fast is refine 0 without TTA"
        assert fast != probabilities(), "the default is the trained setting (2 rounds, TTA)"
        from facegender.core.resources import default_model_path
        app = create_app(default_model_path(), threads=1, fast=True)
        model = app.state.predictor
        assert model.face_config.refine_steps == 0 and model.tta is False
    """,
        tmp_path,
    )
    assert "NO-TORCH-OK" in out
