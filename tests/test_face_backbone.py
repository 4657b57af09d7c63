"""The dlib face backbone inside facegender: frozen-feature training, fine-tuning, the recorded
preprocessing, model files without the package-provided body, ONNX export."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_dataset

from facegender.core import dlib_onnx
from facegender.training.export import export_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("face_recognition_models") is None,
    reason="face_recognition_models (dlib's face ResNet weights) is not installed",
)


def _config(data, out, **overrides):
    from facegender.training.config import build_config

    values = dict(
        data=str(data),
        out=str(out),
        backbone="dlib_resnet",
        align=False,
        frozen_features=True,
        feature_views=2,
        epochs=12,
        batch_size=8,
        lr=0.05,
        patience=12,
    )
    values.update(overrides)
    return build_config(None, **values)


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """A head trained on frozen dlib embeddings of a tiny synthetic set (features cached in the
    test's own folder)."""
    import os

    from facegender.training.train import train

    root = tmp_path_factory.mktemp("frozen")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # read at call time by the feature cache
    try:
        data = make_dataset(root / "data", n_train=16, n_test=4)
        summary = train(_config(data, root / "out"), log=lambda s: None, progress=False)
    finally:
        del os.environ["XDG_CACHE_HOME"]
    return root, summary


def test_dlib_backbone_uses_its_native_size_and_mean():
    from facegender.training.config import build_config
    from facegender.training.train import preprocessing_for

    cfg = build_config(None, backbone="dlib_resnet", align=True)
    assert cfg.image_size == 150
    prep = preprocessing_for(cfg)
    assert prep.mean == dlib_onnx.DLIB_MEAN and prep.std == dlib_onnx.DLIB_STD
    assert prep.face["template"] == "dlib" and prep.face["size"] == 150
    assert tuple(prep.face["pad_color"]) == (0, 0, 0)
    assert build_config(None, backbone="dlib_resnet", image_size=112).image_size == 112  # explicit wins


def test_frozen_features_model_file_holds_only_the_head(frozen_run):
    from facegender.training import checkpoint as ckpt

    root, summary = frozen_run
    path = root / "out" / "best_model.pth"
    record = ckpt.load_file(path)
    assert record["body_weights"] == "pretrained"
    assert set(record["model_state"]) == {"head.1.weight", "head.1.bias"}
    assert path.stat().st_size < 100_000
    from facegender.training.dlib_resnet import converted_weights

    model, _ = ckpt.load_model(path)  # the body comes back from the package: dlib's weights
    for key, value in converted_weights().items():
        assert torch.equal(model.body.state_dict()[key], value), key
    assert summary["test"]["n"] == 8


def test_frozen_features_learn_and_the_cache_is_reused(frozen_run, tmp_path, monkeypatch):
    """The head learns the synthetic classes from embeddings; a second run with the same images
    reads every embedding from the cache instead of running the body."""
    from facegender.training.dlib_resnet import DlibResNet
    from facegender.training.train import train

    root, summary = frozen_run
    assert summary["validation"]["accuracy"] >= 0.75
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    calls = []
    original = DlibResNet.forward
    monkeypatch.setattr(DlibResNet, "forward", lambda self, x: calls.append(len(x)) or original(self, x))
    cfg = _config(root / "data", tmp_path / "again")
    again = train(cfg, log=lambda s: None, progress=False)
    # only the final evaluation (temperature on validation, then test) runs the full model; the
    # embeddings of the training views and of validation come from the cache
    passes = 2 if cfg.tta else 1
    assert sum(calls) == passes * (again["validation"]["n"] + again["test"]["n"])
    assert again["validation"]["accuracy"] == summary["validation"]["accuracy"]


def test_fine_tuning_trains_only_the_last_stages_at_the_scaled_rate(tmp_path):
    from facegender.training.backbones import build_model, freeze_body
    from facegender.training.train import make_optimizer

    cfg = _config(tmp_path, tmp_path, frozen_features=False, trainable_stages=2, body_lr_scale=0.1, lr=1e-3)
    model, _ = build_model("dlib_resnet", 2, pretrained=True)
    freeze_body(model, cfg.trainable_stages, cfg.backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(cfg, model)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-4, 1e-3])
    model.train()
    x = torch.randn(4, 3, 150, 150)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("body.layer4.") for k in changed)
    assert any(k.startswith("body.fc.") for k in changed)
    assert any(k.startswith("head.") for k in changed)
    assert not any(k.startswith(("body.stem.", "body.layer1.", "body.layer2.", "body.layer3.")) for k in changed)


def test_frozen_model_exports_to_onnx_with_parity(frozen_run, tmp_path):
    import facegender

    root, _ = frozen_run
    report = export_model(
        facegender.load(root / "out" / "best_model.pth", device="cpu"),
        tmp_path / "model.onnx",
        data=root / "data",
        log=lambda s: None,
    )
    assert report["parity_max_abs_diff"] <= 1e-3
    assert (tmp_path / "model.onnx").stat().st_size > 5_000_000  # the body is inside the ONNX file


def test_exported_face_backbone_models_predict_without_torch(frozen_run, tmp_path):
    """The three exports of a frozen dlib model (whole, head only, int8) predict in an interpreter
    without PyTorch, with the PyTorch model's probabilities (int8: within its parity tolerance)."""
    import json

    from conftest import run_without_torch

    import facegender
    from facegender.training.export import INT8_TOLERANCE

    root, _ = frozen_run
    model = facegender.load(root / "out" / "best_model.pth", device="cpu")
    exports = {"whole": {}, "head": {"head_only": True}, "int8": {"quantize": "int8", "calibration": root / "data"}}
    sizes = {
        name: export_model(model, tmp_path / f"{name}.onnx", data=root / "data", log=lambda s: None, **kw)["bytes"]
        for name, kw in exports.items()
    }
    assert sizes["head"] < 10_000 and sizes["int8"] < sizes["whole"] / 3
    photos = sorted(str(p) for p in (root / "data" / "test").rglob("*.jpg"))
    expected = [r.faces[0].probabilities for r in model.predict(photos)]
    out = run_without_torch(
        f"""
        import json, os
        os.environ["FACEGENDER_CACHE"] = {str(tmp_path / "cache")!r}
        import facegender
        for name in ("whole", "head", "int8"):
            results = facegender.load({str(tmp_path)!r} + f"/{{name}}.onnx").predict({photos!r})
            print("RESULT", name, json.dumps([r.faces[0].probabilities for r in results]))
    """,
        tmp_path,
    )
    results = dict(line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("RESULT "))
    assert sorted(results) == ["head", "int8", "whole"]
    for name, probs in results.items():
        tolerance = INT8_TOLERANCE if name == "int8" else 1e-4
        got = json.loads(probs)
        assert len(got) == len(expected) == 8
        for want, have in zip(expected, got):
            assert max(abs(want[c] - have[c]) for c in want) <= tolerance, name


def test_frozen_features_train_with_torchrun(tmp_path):
    """Two processes (torchrun, Gloo on the CPU) train the head together; one model file, head only."""
    import os
    import subprocess
    import sys

    from test_distributed import _free_port

    from facegender.training import checkpoint as ckpt

    data = make_dataset(tmp_path / "data", n_train=16, n_test=4)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "facegender",
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--preset",
        "frozen",
        "--no-align",
        "--epochs",
        "2",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Best epoch") == 1  # rank 0 alone reports
    record = ckpt.load_file(tmp_path / "out" / "best_model.pth")
    assert record["backbone"] == "dlib_resnet" and record["body_weights"] == "pretrained"
    assert record["config"]["frozen_features"] is True


def test_prepared_folder_must_have_the_backbones_chip(tmp_path):
    """`prepare --template dlib` makes a folder the face backbone trains on; an ArcFace-aligned folder
    is refused with the fix instead of feeding the network crops of another geometry."""
    from facegender.data.prepare import prepare_dataset
    from facegender.training import checkpoint as ckpt
    from facegender.training.config import build_config
    from facegender.training.train import train

    data = make_dataset(tmp_path / "data", n_train=8, n_test=3)
    prepare_dataset(data, tmp_path / "arcface", {}, progress=False)
    cfg = build_config("best", data=str(tmp_path / "arcface"), out=str(tmp_path / "o1"), epochs=1)
    with pytest.raises(ValueError, match="--template dlib"):
        train(cfg, log=lambda s: None, progress=False)
    prepare_dataset(data, tmp_path / "dlib", {"size": 150, "template": "dlib", "pad_color": (0, 0, 0)}, progress=False)
    cfg = build_config("best", data=str(tmp_path / "dlib"), out=str(tmp_path / "o2"), epochs=1)
    train(cfg, log=lambda s: None, progress=False)
    face = ckpt.load_file(tmp_path / "o2" / "best_model.pth")["preprocessing"]["face"]
    assert face["template"] == "dlib" and face["size"] == 150 and list(face["pad_color"]) == [0, 0, 0]
