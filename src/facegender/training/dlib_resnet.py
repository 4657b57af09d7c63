"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) as a PyTorch module.

The network is the `anet_type` of dlib's `examples/dnn_face_recognition_ex.cpp`: a 29-layer ResNet
that maps a 150x150 RGB face chip to a 128-d descriptor (faces of one person lie within about 0.6
of each other). `DlibResNet` reproduces it layer by layer and `read_dlib_dat` reads the weights
from dlib's own file without dlib; `converted_weights` caches the converted state dict. The file
reader, the constants and the same network as an ONNX graph (no PyTorch) are in core/dlib_onnx.py.

What dlib does, checked against its source (dlib/dnn/layers.h, core.h, input.h, cpu_dlib.cpp,
tensor.h, serialize.h, float_details.h) and against dlib itself (tests/test_dlib_resnet.py):

* input (`input_rgb_image_sized<150>`): channels R, G, B, each `(value - avg) / 256` with avg
  122.782, 117.001, 104.298. `DLIB_MEAN` / `DLIB_STD` express that as a torchvision `Normalize`
  of `x / 255`, so facegender's usual pipeline feeds the network exactly.
* `con_<N,r,c,sy,sx>` has a bias; its padding defaults to 0 when the stride is not 1, else r/2.
  `max_pool<3,3,2,2>` and `avg_pool<2,2,2,2>` have padding 0 (same rule). Outputs are floored.
* `affine_` is batch norm folded into a per-channel scale (gamma) and shift (beta).
* `add_prev` of tensors of different shapes gives the elementwise maximum shape; each input sits at
  index 0 (top-left corner, first channels) and the rest is zero. In the down-sampling blocks the
  shortcut is `avg_pool(x)` with fewer channels and the residual branch (3x3 conv, stride 2,
  no padding) can be one pixel smaller: at 150 px the third down block adds a 3x3 branch to a 4x4
  shortcut and the last one a 1x1 branch to a 2x2 shortcut.
* `avg_pool_everything` is a global mean; `fc_no_bias<128>` stores its matrix as
  (num_inputs, num_outputs) and computes `x @ W`.
* Chips: dlib's `get_face_chip(img, shape, 150, 0.25)`, black outside the photo.
  `chip_from_landmarks` makes the same chip from RetinaFace's landmarks (DLIB_CHIP_TEMPLATE_150).
* The descriptor is the fc output as is: not normalised (length 1.32-1.52 on 20 faces-dev/test
  chips); dlib compares faces by Euclidean distance (same person below about 0.6).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegender.core.cache import cache_folder, cached_file
from facegender.core.dlib_onnx import (
    _LEVELS,
    CHIP_SIZE,
    DLIB_MEAN,
    DLIB_STD,
    EMBEDDING_DIM,
    WEIGHTS_SHA256,
    checked_weights_file,
    read_dlib_arrays,
    weights_file,
)
from facegender.core.faces.align import DLIB_CHIP_FILL, FaceAlignConfig, align_face
from facegender.core.preprocessing import Preprocessing, normalize

_CACHE_FORMAT = "facegender-dlib-resnet-v1"

#: The chip geometry (DLIB_CHIP_TEMPLATE_150: RetinaFace's landmarks in dlib's 150 px chip) and
#: its fill (black, as dlib's extract_image_chip) live with the rest of the face stage, in core/faces/align.py.
CHIP_FILL = DLIB_CHIP_FILL


# ----------------------------------------------------------------------------------------------
# The network


class Affine(nn.Module):
    """dlib's `affine_` layer: y = x * weight[c] + bias[c] (batch norm with frozen statistics
    folded into one scale and shift per channel). Parameters, so fine-tuning can train them."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return str(self.weight.numel())


class ResBlock(nn.Module):
    """dlib's `ares` (stride 1) and `ares_down` (stride 2) residual blocks.

    branch = affine2(conv2(relu(affine1(conv1(x))))); shortcut = x, or avg_pool 2x2/2 of x when
    down-sampling; out = relu(branch + shortcut), where dlib's add pads the smaller tensor with
    zeros at the end of each dimension (the shortcut gets channels, the branch pixels).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        if not downsample and in_channels != out_channels:
            raise ValueError("a block without down-sampling keeps the channel count")
        stride = 2 if downsample else 1
        self.downsample = downsample
        self.extra_channels = out_channels - in_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=0 if downsample else 1)
        self.affine1 = Affine(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1)
        self.affine2 = Affine(out_channels)
        self.shortcut = nn.AvgPool2d(2, 2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        s = self.shortcut(x)
        if self.downsample:
            # avg_pool gives floor(n/2) pixels, the unpadded stride-2 conv floor((n-1)/2): the
            # branch is never larger, and never has fewer channels.
            y = F.pad(y, (0, s.shape[3] - y.shape[3], 0, s.shape[2] - y.shape[2]))
            if self.extra_channels:
                s = F.pad(s, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(y + s)


def _level(in_channels: int, channels: int, blocks: int, downsample: bool) -> nn.Sequential:
    layers = [ResBlock(in_channels, channels, downsample)]
    layers += [ResBlock(channels, channels, False) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1).

    Input: (N, 3, H, W) float RGB, normalised as `(x / 255 - DLIB_MEAN) / DLIB_STD` (torchvision
    `ToTensor` + `Normalize(DLIB_MEAN, DLIB_STD)`); dlib's chips are 150x150 and other sizes run
    but were never trained. Output: the 128-d descriptor, exactly what dlib's
    `compute_face_descriptor` returns for the chip (not normalised).

    Parts, for freezing: `stem` (7x7 conv, affine, relu, 3x3 max pool and dlib's level4: three
    32-channel blocks), `layer1` .. `layer4` (dlib's level3 .. level0: 64, 128, 256, 256
    channels, each starting with a down-sampling block), `fc` (256 -> 128, no bias).
    `features(x)` gives the 256-d pooled features before `fc`.
    """

    def __init__(self):
        super().__init__()
        (c4, n4, _), *rest = _LEVELS
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(3, c4, 7, 2, padding=0)),
                    ("affine", Affine(c4)),
                    ("relu", nn.ReLU()),
                    ("pool", nn.MaxPool2d(3, 2, padding=0)),
                    ("blocks", _level(c4, c4, n4, False)),
                ]
            )
        )
        channels = c4
        for i, (c, n, down) in enumerate(rest, start=1):
            setattr(self, f"layer{i}", _level(channels, c, n, down))
            channels = c
        self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_dlib_resnet(cache_dir: str | os.PathLike | None = None) -> DlibResNet:
    """DlibResNet with dlib's weights (converted once, then cached; see `converted_weights`), in
    eval mode."""
    net = DlibResNet()
    net.load_state_dict(converted_weights(cache_dir))
    return net.eval()


def chip_from_landmarks(image, landmarks: np.ndarray, size: int = CHIP_SIZE):
    """dlib-style face chip (PIL RGB, size x size, black outside the photo) from RetinaFace's 5
    landmarks (`facegender.core.faces.DetectedFace.landmarks`), using DLIB_CHIP_TEMPLATE_150."""
    config = FaceAlignConfig(size=size, template="dlib", pad_color=DLIB_CHIP_FILL)
    return align_face(image, landmarks, config)


def to_input(chips: np.ndarray | list) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB chips -> normalised float (N, 3, H, W) tensor."""
    arr = np.asarray(chips)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB chips shaped (N, H, W, 3), got {arr.shape}")
    prep = Preprocessing(image_size=arr.shape[1], mean=DLIB_MEAN, std=DLIB_STD)
    return torch.from_numpy(normalize(arr.transpose(0, 3, 1, 2), prep))


# ----------------------------------------------------------------------------------------------
# Reading dlib's file


def read_dlib_dat(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """DlibResNet's state dict from dlib's serialised face-recognition network: the arrays of
    `core.dlib_onnx.read_dlib_arrays` as tensors. A file that is not that network raises ValueError
    naming it."""
    arrays = read_dlib_arrays(path)
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    expected = DlibResNet().state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"{path}: the parameters read do not fit DlibResNet")  # a bug here, not in the file
    return {k: state[k] for k in expected}


# ----------------------------------------------------------------------------------------------
# Weights file and cache


def default_cache_dir() -> Path:
    """Where the converted weights are cached: `resources.cache_dir()`."""
    return cache_folder()


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _load_cache(path: Path, source_sha256: str) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None (with a warning) when the file is damaged or stale."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(obj, dict)
            and obj.get("format") == _CACHE_FORMAT
            and obj.get("source_sha256") == source_sha256
            and isinstance(obj.get("state_dict"), dict)
            and obj.get("tensors_sha256") == _tensors_sha256(obj["state_dict"])
        )
    except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
        warnings.warn(f"{path}: unreadable cache ({exc.__class__.__name__}: {exc}); rebuilding it", stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"{path}: cache does not match its checksums; rebuilding it", stacklevel=3)
        return None
    return obj["state_dict"]


def converted_weights(cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """DlibResNet's state dict from dlib's .dat (see `weights_file`), converted on first use and
    then read from `<cache>/dlib_resnet_v1-<sha256 of the .dat, 16 hex>.pth` (`cache.cached_file`).

    The .dat must have WEIGHTS_SHA256. The cache holds the sha256 of the .dat and of its tensors
    and is rebuilt when either does not match (a damaged or edited file is never used). It is
    written atomically (temporary file in the same folder, then rename).
    """
    source = checked_weights_file(weights_file())
    state: dict[str, torch.Tensor] | None = None

    def valid(path: Path) -> bool:
        nonlocal state
        state = _load_cache(path, WEIGHTS_SHA256)
        return state is not None

    def build(tmp: Path) -> None:
        nonlocal state
        state = read_dlib_dat(source)
        torch.save(
            {
                "format": _CACHE_FORMAT,
                "source_sha256": WEIGHTS_SHA256,
                "tensors_sha256": _tensors_sha256(state),
                "state_dict": state,
            },
            tmp,
        )

    cached_file(cache_folder(cache_dir), f"dlib_resnet_v1-{WEIGHTS_SHA256[:16]}", ".pth", build, valid=valid)
    return state
