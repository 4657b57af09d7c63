"""`facegender export --quantize fp16`: float16 weights, float32 arithmetic. The file is about half
the size of fp32, matches PyTorch within FP16_TOLERANCE, says fp16 in its metadata and loads
without PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_torch
from PIL import Image

from facegender.training.export import export_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SIZE = 150  # dlib's face chip


def _picture(rng: np.random.Generator, i: int) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 picture of a colour ramp with stripes (random noise would average out
    in the network's global pooling and give every image nearly the same output)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    along = x if i % 2 else y
    across = y if i % 3 else x
    picture = (
        rng.uniform(0, 1, (1, 1, 3))
        + 0.5 * rng.uniform(-1, 1, (1, 1, 3)) * along[..., None]
        + 0.3 * np.sin(2 * np.pi * across * SIZE / rng.integers(4, 30))[..., None]
    )
    return np.clip(picture * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = [folder / f"picture{i:02d}.png" for i in range(16)]
    for i, path in enumerate(paths):
        Image.fromarray(_picture(rng, i)).save(path)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def dlib_model(pictures):
    """An `inference.Model` around a randomly initialised dlib_resnet network (no weight file
    needed) on plain crops, its head scaled so that the pictures' logits are of order 1 (their
    probabilities spread out instead of all being about 0.5)."""
    from facegender.core.model import Model
    from facegender.core.preprocessing import Preprocessing
    from facegender.training.backbones import build_model
    from facegender.training.torch_backend import TorchBackend

    torch.manual_seed(0)
    network, _ = build_model("dlib_resnet", 2, 0.2, pretrained=False)
    prep = Preprocessing(image_size=SIZE, mean=(0.48, 0.46, 0.41), std=(1.0, 1.0, 1.0))
    info = {
        "backbone": "dlib_resnet",
        "classes": ["female", "male"],
        "preprocessing": prep.to_dict(),
        "body_weights": "stored",
        "pretrained": False,
    }
    model = Model(info["classes"], prep, TorchBackend(network, "cpu", "fp32"), tta=True, detect=False, info=info)
    network.eval()
    with torch.no_grad():
        features = network.body(
            torch.from_numpy(model.normalize([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in pictures]))
        )
        linear = network.head[1]
        linear.weight.mul_(2 / features.std(0).mean())
        linear.bias.sub_(linear.weight @ features.mean(0))
    return model


@pytest.fixture(scope="module")
def exports(dlib_model, pictures, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    data = str(Path(pictures[0]).parent)
    reports = {
        q: export_model(
            dlib_model, root / f"{q}.onnx", data=data, quantize=None if q == "fp32" else q, log=lambda s: None
        )
        for q in ("fp32", "fp16")
    }
    return root, reports


def test_fp16_file_is_half_the_size_and_says_so(exports):
    import onnx
    from onnx import TensorProto

    root, reports = exports
    fp32, fp16 = (root / "fp32.onnx").stat().st_size, (root / "fp16.onnx").stat().st_size
    assert reports["fp16"]["bytes"] == fp16 and reports["fp32"]["bytes"] == fp32
    assert fp16 < 0.6 * fp32
    assert reports["fp16"]["quantization"] == "fp16" and reports["fp32"]["quantization"] == "fp32"
    proto = onnx.load(str(root / "fp16.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["quantization"]) == "fp16"
    assert "quantization" not in {p.key for p in onnx.load(str(root / "fp32.onnx")).metadata_props}
    # every large weight is float16 and cast back to float32 before use; the graph computes in float32
    large = [i for i in proto.graph.initializer if int(np.prod(i.dims)) > 16]
    assert large and all(i.data_type == TensorProto.FLOAT16 for i in large)
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert len(casts) >= len(large)
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_fp16_probabilities_match_pytorch(dlib_model, exports, pictures):
    from scipy.special import softmax

    from facegender.core.onnx_model import load_onnx_classifier
    from facegender.training.export import FP16_TOLERANCE

    root, reports = exports
    assert reports["fp16"]["parity_max_abs_diff"] <= FP16_TOLERANCE
    assert reports["fp16"]["parity_agreement"] == 1.0
    assert reports["fp32"]["parity_max_abs_diff"] <= 1e-4  # the rounding of the weights is all that differs
    backend, meta = load_onnx_classifier(root / "fp16.onnx", threads=1)
    assert meta["quantization"] == "fp16"
    assert backend.precision == "fp32" and backend.quantization == "fp16"  # stored fp16, computed fp32
    batch = dlib_model.normalize([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in pictures])
    want = dlib_model.backend(batch)  # the network alone (Model.logits adds the mirror-image TTA)
    assert np.abs(want).max() > 1 and softmax(want, 1)[:, 0].std() > 0.1  # a test with something to lose
    got = backend(batch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.01 * float(np.abs(want).max()))
    assert np.abs(softmax(got, 1) - softmax(want, 1)).max() <= FP16_TOLERANCE


def test_fp16_file_predicts_without_torch_or_dlib_weights_package(dlib_model, exports, pictures, tmp_path):
    from facegender.training.export import FP16_TOLERANCE

    root, _ = exports
    photos = pictures[:4]
    expected = [r.faces[0].probabilities for r in dlib_model.predict(photos)]
    out = run_without_torch(
        f"""
        import json
        class _NoDlibWeights:  # a whole network needs no package for its body either
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "face_recognition_models":
                    raise ModuleNotFoundError("No module named 'face_recognition_models' (blocked)", name=name)
        sys.meta_path.insert(0, _NoDlibWeights())
        import facegender
        model = facegender.load({str(root / "fp16.onnx")!r})
        results = model.predict({photos!r})
        print("RESULT", model.precision, json.dumps([r.faces[0].probabilities for r in results]))
    """,
        tmp_path,
    )
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT ")]
    _, precision, probs = line.split(" ", 2)
    assert precision == "fp32"
    for want, have in zip(expected, json.loads(probs), strict=True):
        assert max(abs(want[c] - have[c]) for c in want) <= FP16_TOLERANCE


def test_store_weights_fp16_keeps_small_out_of_range_and_input_tensors(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from facegender.training.export import store_weights_fp16

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    huge = np.full((8, 4), 1e6, np.float32)  # beyond float16's range: stays float32
    bias = np.ones(8, np.float32)  # 8 elements: not worth converting
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("MatMul", ["c", "huge"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b"), numpy_helper.from_array(huge, "huge")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert store_weights_fp16(proto) == 1
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types == {"w_fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT, "huge": TensorProto.FLOAT}
    onnx.checker.check_model(proto, full_check=True)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, (x @ w.astype(np.float16).astype(np.float32) + bias) @ huge, rtol=1e-4)


def test_cli_exports_fp16(dlib_model, pictures, tmp_path, capsys):
    from facegender.app.cli import main
    from facegender.training import checkpoint as ckpt

    config = {"backbone": "dlib_resnet", "dropout": 0.2, "pretrained": False, "frozen_features": False, "weights": None}
    record = ckpt.model_record(
        dlib_model.backend.module, config, dlib_model.classes, dlib_model.prep, "random", temperature=1.0, tta=True
    )
    assert record["body_weights"] == "stored"
    ckpt.save_atomic(record, tmp_path / "best_model.pth")
    code = main(
        [
            "export",
            "--model",
            str(tmp_path / "best_model.pth"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--quantize",
            "fp16",
            "--data",
            str(Path(pictures[0]).parent),
            "--parity-images",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "float16" in out and "fp16" in out
    assert 10e6 < (tmp_path / "m.onnx").stat().st_size < 12e6  # dlib's network: 22.5 MB in fp32
