"""Backbones, heads, pretrained weight resolution and stem freezing."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from facegender.training import backbones as M


def test_head_is_dropout_then_linear_for_the_classes():
    net, source = M.build_model("resnet18", num_classes=3, dropout=0.4, pretrained=False)
    assert source == "random"
    assert isinstance(net.head[0], nn.Dropout) and net.head[0].p == 0.4
    assert isinstance(net.head[1], nn.Linear) and net.head[1].out_features == 3
    net.eval()
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v3_large", "efficientnet_b0"])
def test_every_registered_family_builds_a_classifier(name):
    net, _ = M.build_model(name, num_classes=2, pretrained=False)
    net.eval()
    assert net(torch.zeros(1, 3, 96, 96)).shape == (1, 2)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        M.get_spec("vgg99")


def test_packaged_lite0_weights_load_and_are_imagenet_weights():
    body, dim, source = M.create_body("efficientnet_lite0", pretrained=True)
    assert dim == 1280 and source.endswith(".pth")
    random_body, _, _ = M.create_body("efficientnet_lite0", pretrained=False)
    w, r = body.net._conv_stem.weight, random_body.net._conv_stem.weight
    assert not torch.equal(w, r)


def _resnet18_file(path):
    import torchvision

    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), path)
    return net


def test_explicit_weights_file_is_used(tmp_path):
    ref = _resnet18_file(tmp_path / "mine.pth")
    body, dim, source = M.create_body("resnet18", weights_file=str(tmp_path / "mine.pth"))
    assert source == str(tmp_path / "mine.pth") and dim == 512
    assert torch.equal(body.conv1.weight, ref.conv1.weight)


def test_torch_home_cache_is_used_before_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    ref = _resnet18_file(cache / "resnet18-f37072fd.pth")

    def no_download(*a, **k):
        raise AssertionError("must not download when the cache has the file")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    body, _, source = M.create_body("resnet18")
    assert source == str(cache / "resnet18-f37072fd.pth")
    assert torch.equal(body.conv1.weight, ref.conv1.weight)


def test_offline_without_weights_stops_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(M.WeightsNotFoundError) as err:
        M.build_model("resnet18", num_classes=2)
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "--weights" in msg and "efficientnet_lite0" in msg and "--no-pretrained" in msg


def test_weights_for_another_network_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(M.WeightsNotFoundError, match="do not fit resnet18"):
        M.create_body("resnet18", weights_file=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(M.WeightsNotFoundError, match="not a readable"):
        M.create_body("resnet18", weights_file=str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_freeze_stem_stops_gradients_and_batchnorm_updates(name):
    from torchvision.ops import FrozenBatchNorm2d

    net, _ = M.build_model(name, num_classes=2, pretrained=False)
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = M.freeze_stem(net, name)
    assert frozen > 0
    stem = M.get_spec(name).stem(net.body)
    assert not [m for s in stem for m in s.modules() if isinstance(m, nn.BatchNorm2d)]
    stem_bn = [m for s in stem for m in s.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert stem_bn and torch.equal(stem_bn[0].running_mean, before_state[_key(net, stem_bn[0]) + "running_mean"])
    before = stem_bn[0].running_mean.clone()
    net.train()  # a plain train(): the frozen statistics cannot be switched back on
    assert net.head.training
    out = net(torch.randn(4, 3, 64, 64))
    out.sum().backward()
    assert all(p.grad is None for s in stem for p in s.parameters())
    assert net.head[1].weight.grad is not None
    assert torch.equal(stem_bn[0].running_mean, before)
    # a model file of the frozen network loads into a plain one (prediction builds it unfrozen)
    plain, _ = M.build_model(name, num_classes=2, pretrained=False)
    plain.load_state_dict({k: v for k, v in net.state_dict().items()})
    plain.eval(), net.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(plain(x), net(x), atol=1e-5)


def _key(net, module) -> str:
    return next(name for name, m in net.named_modules() if m is module) + "."


def test_lite0_batchnorm_follows_fine_tuning_at_pytorch_momentum():
    net, _ = M.build_model("efficientnet_lite0", num_classes=2, pretrained=False)
    momenta = {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}
