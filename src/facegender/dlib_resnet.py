"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) as a PyTorch module.

The network is the `anet_type` of dlib's `examples/dnn_face_recognition_ex.cpp`: a 29-layer ResNet
that maps a 150x150 RGB face chip to a 128-d descriptor (faces of one person lie within about 0.6
of each other). `DlibResNet` reproduces it layer by layer and `read_dlib_dat` reads the weights
from dlib's own file without dlib; `converted_weights` caches the converted state dict.

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
import importlib.util
import io
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegender.faces import DLIB_CHIP_FILL, DLIB_CHIP_TEMPLATE_150, FaceAlignConfig, align_face  # noqa: F401
from facegender.resources import cache_dir

#: dlib's `input_rgb_image_sized` means (R, G, B) and scale, as `Normalize(mean, std)` of `x / 255`.
DLIB_MEAN = (122.782 / 255.0, 117.001 / 255.0, 104.298 / 255.0)
DLIB_STD = (256.0 / 255.0, 256.0 / 255.0, 256.0 / 255.0)
#: Chip side the network was trained on (and the only size dlib's input layer accepts).
CHIP_SIZE = 150
#: Padding of `dlib.get_face_chip_details(shape, 150, 0.25)` (dlib's face-recognition default).
CHIP_PADDING = 0.25
EMBEDDING_DIM = 128
FEATURE_DIM = 256  # pooled features before the last (fc) layer

WEIGHTS_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
#: sha256 of the file in face_recognition_models 0.3.0 (and dlib.net's download, unpacked).
WEIGHTS_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
_CACHE_FORMAT = "facegender-dlib-resnet-v1"

#: The chip geometry (DLIB_CHIP_TEMPLATE_150: RetinaFace's landmarks in dlib's 150 px chip) and
#: its fill (black, as dlib's extract_image_chip) live with the rest of the face stage, in faces.py.
CHIP_FILL = DLIB_CHIP_FILL

# (channels, number of blocks, first block downsamples) for dlib's level4 .. level0.
_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


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
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, c4, 7, 2, padding=0)),
            ("affine", Affine(c4)),
            ("relu", nn.ReLU()),
            ("pool", nn.MaxPool2d(3, 2, padding=0)),
            ("blocks", _level(c4, c4, n4, False)),
        ]))
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
    landmarks (`facegender.faces.DetectedFace.landmarks`), using DLIB_CHIP_TEMPLATE_150."""
    config = FaceAlignConfig(size=size, template="dlib", pad_color=DLIB_CHIP_FILL)
    return align_face(image, landmarks, config)


def to_input(chips: np.ndarray | list) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 RGB chips -> normalised float (N, 3, H, W) tensor."""
    arr = np.asarray(chips)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB chips shaped (N, H, W, 3), got {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float() / 255.0
    mean = torch.tensor(DLIB_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DLIB_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Reading dlib's file


class _Reader:
    """dlib's serialisation primitives (dlib/serialize.h, dlib/dnn/tensor.h)."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.name}: not dlib's face recognition ResNet (anet_type of "
                          f"dnn_face_recognition_ex.cpp): {what} (at byte {self.pos} of {len(self.data)})")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what} (truncated?)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self, what: str) -> int:
        # One control byte: bit 7 = negative, low 4 bits = number of little-endian magnitude bytes.
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self.fail(f"bad integer encoding 0x{control:02x} for {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def expect_int(self, expected: int, what: str) -> None:
        start = self.pos
        value = self.int(what)
        if value != expected:
            self.pos = start
            raise self.fail(f"{what} is {value}, expected {expected}")

    def string(self, what: str) -> str:
        n = self.int(what)
        if n < 0 or n > 256:
            raise self.fail(f"implausible string length {n} for {what}")
        try:
            return self.take(n, what).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not text") from None

    def expect_string(self, expected: str | tuple[str, ...], what: str) -> str:
        start = self.pos
        value = self.string(what)
        options = (expected,) if isinstance(expected, str) else expected
        if value not in options:
            self.pos = start
            raise self.fail(f"found {value!r} where {' or '.join(map(repr, options))} ({what}) was expected")
        return value

    def float(self, what: str) -> float:
        # float_details: int64 mantissa and int16 exponent, value = mantissa * 2**exponent.
        control = self.data[self.pos] if self.pos < len(self.data) else 0
        if control & 0x70:
            raise self.fail(f"{what}: dlib's old text encoding of floats is not supported")
        mantissa, exponent = self.int(what), self.int(what)
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        if exponent in special:
            return special[exponent]
        return float(np.ldexp(np.float64(mantissa), exponent))

    def bool(self, what: str) -> bool:
        ch = self.take(1, what)
        if ch not in (b"0", b"1"):
            self.pos -= 1
            raise self.fail(f"bad boolean {ch!r} for {what}")
        return ch == b"1"

    def tensor(self, what: str) -> np.ndarray:
        version = self.int(what)
        dims = [self.int(what) for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.fail(f"negative tensor size {dims} in {what}")
        n = int(np.prod(dims))
        if version == 2:  # raw little-endian float32
            raw = self.take(4 * n, what)
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif version == 1:  # one dlib float each
            values = np.array([self.float(what) for _ in range(n)], dtype=np.float32)
        else:
            raise self.fail(f"unknown tensor version {version} in {what}")
        return values.reshape(dims)

    def alias(self, what: str) -> list[int]:
        self.expect_int(1, f"{what} (alias_tensor version)")
        return [self.int(what) for _ in range(4)]


def _describe_network() -> list[tuple]:
    """dlib's anet_type as a chain of layers, input side first:
    ("con", key, out, in, k, stride) / ("affine", key, channels) / ("relu",) / ("max_pool", k, s)
    / ("avg_pool", k, s) (k = 0: avg_pool_everything) / ("add_prev", tag) / ("tag", id) /
    ("skip", id) / ("fc", key, in, out). Keys are the DlibResNet parameter prefixes."""
    chain: list[tuple] = [("con", "stem.conv", 32, 3, 7, 2), ("affine", "stem.affine", 32), ("relu",),
                          ("max_pool", 3, 2)]
    channels = 32
    prefixes = ["stem.blocks", "layer1", "layer2", "layer3", "layer4"]
    for prefix, (c, n, down) in zip(prefixes, _LEVELS):
        for i in range(n):
            key = f"{prefix}.{i}"
            is_down = down and i == 0
            chain += [("tag", 1),
                      ("con", f"{key}.conv1", c, channels, 3, 2 if is_down else 1), ("affine", f"{key}.affine1", c),
                      ("relu",),
                      ("con", f"{key}.conv2", c, c, 3, 1), ("affine", f"{key}.affine2", c)]
            if is_down:
                chain += [("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2)]
            else:
                chain += [("add_prev", 1)]
            chain += [("relu",)]
            channels = c
    chain += [("avg_pool", 0, 1), ("fc", "fc", channels, EMBEDDING_DIM)]
    return chain


def _read_layer(r: _Reader, layer: tuple, out: dict[str, np.ndarray]) -> None:
    kind = layer[0]
    where = f"layer {kind} {layer[1]}" if kind in ("con", "affine", "fc") else f"layer {kind}"
    if kind == "con":
        _, key, n_out, n_in, k, stride = layer
        pad = 0 if stride != 1 else k // 2
        version = r.expect_string(("con_4", "con_5"), where)
        params = r.tensor(f"{where} parameters")
        r.expect_int(n_out, f"{where} number of filters")
        for value, name in ((k, "rows"), (k, "columns"), (stride, "stride y"), (stride, "stride x"),
                            (pad, "padding y"), (pad, "padding x")):
            r.expect_int(value, f"{where} {name}")
        filters = r.alias(f"{where} filter shape")
        biases = r.alias(f"{where} bias shape")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float(f"{where} {name} multiplier")
        use_bias = r.bool(f"{where} use_bias") if version == "con_5" else True
        n_w = n_out * n_in * k * k
        if filters != [n_out, n_in, k, k] or not use_bias or biases != [1, n_out, 1, 1] \
                or params.size != n_w + n_out:
            raise r.fail(f"{where}: filters {filters}, biases {biases}, {params.size} parameters; expected "
                         f"filters {[n_out, n_in, k, k]} with {n_out} biases")
        flat = params.reshape(-1)
        out[f"{key}.weight"] = flat[:n_w].reshape(n_out, n_in, k, k)
        out[f"{key}.bias"] = flat[n_w:]
    elif kind == "affine":
        _, key, c = layer
        r.expect_string("affine_", where)
        params = r.tensor(f"{where} parameters")
        gamma = r.alias(f"{where} gamma shape")
        beta = r.alias(f"{where} beta shape")
        r.expect_int(0, f"{where} mode (CONV_MODE)")
        if gamma != [1, c, 1, 1] or beta != gamma or params.size != 2 * c:
            raise r.fail(f"{where}: gamma {gamma}, beta {beta}, {params.size} parameters; expected {c} channels")
        flat = params.reshape(-1)
        out[f"{key}.weight"] = flat[:c]
        out[f"{key}.bias"] = flat[c:]
    elif kind == "relu":
        r.expect_string("relu_", where)
    elif kind in ("max_pool", "avg_pool"):
        _, k, stride = layer
        r.expect_string(f"{kind}_2", where)
        pad = 0 if stride != 1 else k // 2
        for value, name in ((k, "rows"), (k, "columns"), (stride, "stride y"), (stride, "stride x"),
                            (pad, "padding y"), (pad, "padding x")):
            r.expect_int(value, f"{where} {name}")
    elif kind == "add_prev":
        r.expect_string("add_prev_", where)
    elif kind == "fc":
        _, key, n_in, n_out = layer
        r.expect_string("fc_2", where)
        r.expect_int(n_out, f"{where} number of outputs")
        r.expect_int(n_in, f"{where} number of inputs")
        params = r.tensor(f"{where} parameters")
        weights = r.alias(f"{where} weight shape")
        r.alias(f"{where} bias shape")
        r.expect_int(1, f"{where} bias mode (FC_NO_BIAS = 1)")
        for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
            r.float(f"{where} {name} multiplier")
        if weights != [n_in, n_out, 1, 1] or params.size != n_in * n_out:
            raise r.fail(f"{where}: weights {weights}, {params.size} parameters; expected {n_in}x{n_out}, no bias")
        # dlib computes x @ W with W stored (num_inputs, num_outputs); torch's Linear holds W^T.
        out[f"{key}.weight"] = np.ascontiguousarray(params.reshape(n_in, n_out).T)
    else:  # pragma: no cover - _describe_network only makes the kinds above
        raise AssertionError(kind)


def read_dlib_dat(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Parse dlib's serialised face-recognition network and return a state dict for DlibResNet.

    The file holds `add_loss_layer` (version, then `loss_metric_`, then the network). Each
    `add_layer` writes its version and then its subnetwork before its own layer, so the file
    lists the version numbers from the loss down to the input layer, then the input layer, then
    the layers from the input upwards, each followed by the add_layer's state (3 booleans, 3
    empty cached tensors, and for the layer on the input its sample expansion factor). Tags and skips write only a version. Anything else (another network,
    a truncated or damaged file, trailing bytes) raises ValueError naming the file.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), str(path))
    chain = _describe_network()

    r.expect_int(1, "add_loss_layer version")
    r.expect_string(("loss_metric_", "loss_metric_2"), "loss layer")
    r.float("loss margin")
    r.float("loss distance threshold")
    # Versions, outermost first: add_layer 2 (3 for the one on the input layer), tag and skip 1.
    for i, layer in enumerate(reversed(chain)):
        innermost = i == len(chain) - 1
        expected = 1 if layer[0] in ("tag", "skip") else (3 if innermost else 2)
        r.expect_int(expected, f"version of the {len(chain) - i}th layer from the input ({layer[0]})")
    r.expect_string("input_rgb_image_sized", "input layer")
    for name, mean in zip(("red", "green", "blue"), (122.782, 117.001, 104.298)):
        value = r.float(f"input layer mean {name}")
        if abs(value - mean) > 1e-3:
            raise r.fail(f"input layer mean {name} is {value}, expected {mean}")
    r.expect_int(CHIP_SIZE, "input rows")
    r.expect_int(CHIP_SIZE, "input columns")

    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(chain):
        if layer[0] in ("tag", "skip"):
            continue
        _read_layer(r, layer, arrays)
        for name in ("setup called", "gradient stale", "output disabled"):
            r.bool(f"add_layer state ({name}) after {layer[0]}")
        for name in ("x_grad", "cached_output", "grad_final"):
            r.tensor(f"add_layer {name} after {layer[0]}")
        if i == 0:
            r.expect_int(1, "sample expansion factor")
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected bytes after the network")

    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
    expected = DlibResNet().state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise r.fail("the parameters read do not fit DlibResNet")  # a bug here, not in the file
    return {k: state[k] for k in expected}


# ----------------------------------------------------------------------------------------------
# Weights file and cache


def weights_file() -> Path:
    """Path of dlib_face_recognition_resnet_model_v1.dat from the face_recognition_models package
    (found without importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{WEIGHTS_FILENAME} comes with the Python package face_recognition_models, "
                                "which is not installed: pip install face_recognition_models==0.3.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with pip install face_recognition_models==0.3.0")
    return path


def default_cache_dir() -> Path:
    """Where the converted weights are cached: `resources.cache_dir()`."""
    return cache_dir()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        ok = (isinstance(obj, dict) and obj.get("format") == _CACHE_FORMAT
              and obj.get("source_sha256") == source_sha256 and isinstance(obj.get("state_dict"), dict)
              and obj.get("tensors_sha256") == _tensors_sha256(obj["state_dict"]))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is rebuilt
        warnings.warn(f"{path}: unreadable cache ({exc.__class__.__name__}: {exc}); rebuilding it", stacklevel=3)
        return None
    if not ok:
        warnings.warn(f"{path}: cache does not match its checksums; rebuilding it", stacklevel=3)
        return None
    return obj["state_dict"]


def converted_weights(cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """DlibResNet's state dict from dlib's .dat (see `weights_file`), converted on first use and
    then read from `<cache>/dlib_resnet_v1-<sha256 of the .dat, 16 hex>.pth`.

    The .dat must have WEIGHTS_SHA256. The cache holds the sha256 of the .dat and of its tensors
    and is rebuilt when either does not match (a damaged or edited file is never used). It is
    written atomically (temporary file in the same folder, then rename).
    """
    source = weights_file()
    digest = _sha256_file(source)
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{source}: sha256 {digest} is not that of dlib's {WEIGHTS_FILENAME} "
                         f"({WEIGHTS_SHA256}); reinstall face_recognition_models==0.3.0")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"dlib_resnet_v1-{digest[:16]}.pth"
    if target.is_file():
        state = _load_cache(target, digest)
        if state is not None:
            return state
    state = read_dlib_dat(source)
    payload = {"format": _CACHE_FORMAT, "source_sha256": digest, "tensors_sha256": _tensors_sha256(state),
               "state_dict": state}
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state
