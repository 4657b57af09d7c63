"""The ONNX file format: writing a trained model as one ONNX file, and running it without PyTorch.

The file holds the classifier network (input `input`: normalised float32 images (N, 3, S, S) with a
dynamic batch size; output `logits` (N, C)) and, in its `metadata_props`, everything else a
prediction needs: class names, preprocessing (image size, mean/std, face alignment settings),
temperature, test-time augmentation, backbone and the training metrics. Every value is stored as
JSON and read back with `json.loads`.

The network is exported with PyTorch's TorchScript-based exporter (`dynamo=False`). It needs no
package beyond `onnx`; the newer torch.export-based exporter needs `onnxscript`, which this
project does not install. Before the file is written, onnxruntime's probabilities are compared
with PyTorch's on real images (or synthetic ones) and the export fails above a tolerance
(`export_model`, called by `facegender.export` and `facegender export`).

A model whose body stayed at the pretrained weights of an installed package (dlib's face
descriptor, `--preset frozen`) can also be written head-only (`head_only=True`, `facegender export
--head-only`): the file then holds only the head (input `embedding` (N, D)) and a `body` entry in
its metadata; loading builds the body's ONNX graph from that package's weight file
(`core.dlib_onnx.body_onnx_path`, cached) and runs the two in turn. That is how the bundled default
model ships (a few KB).

With `quantize="int8"` the network is quantized statically (onnxruntime.quantization, QDQ,
per-channel int8 weights, uint8 activations) with a calibration set drawn from training images.
With `quantize="fp16"` the graph still computes in float32, but its weights are stored as float16,
each followed by a `Cast` to float32 (`store_weights_fp16`): onnxruntime folds those casts when the
session is created, so the file is about half the size and runs as fast as fp32.

`core.onnx_model.OnnxBackend` runs such a file for `core.model.Model` (and so for `predict`, `evaluate` and
`serve`): `facegender.load("model.onnx")` works like `facegender.load("best_model.pth")`. Reading
and running a file needs onnxruntime and numpy only: no torch and no `onnx` package (the metadata
is read through onnxruntime). torch and onnx are imported only to write a file.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facegender.core.errors import ConfigError, FacegenderError, InputFileError, InputNotFoundError
from facegender.core.files import CheckpointError, atomic_path
from facegender.core.onnx_model import BODY_OUTPUT_NAME, INPUT_NAME, OUTPUT_NAME, load_onnx_classifier, onnx_metadata

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
#: Tolerance of the parity check of an int8 file: quantization moves probabilities by a few hundredths.
INT8_TOLERANCE = 0.1
#: Tolerance of the parity check of a file with float16 weights (`quantize="fp16"`). Rounding the
#: weights of dlib's face ResNet (with the bundled model's head) to float16 moved calibrated
#: probabilities by at most 5.6e-4 on the 64 parity faces of faces-gdf/test, and by at most 2.5e-3
#: (mean 1e-4, same class for all) on all 550 faces of faces-gdf/test and faces-ood; 1e-2 leaves
#: margin for a sharper fine-tuned head, while a broken conversion moves them by tenths.
FP16_TOLERANCE = 1e-2
#: A float32 initializer with more elements than this is stored as float16 by `store_weights_fp16`;
#: smaller ones (shapes, scalars, a few biases) stay float32 (no size to gain).
FP16_MIN_ELEMENTS = 16
#: The storage formats of `export_model(quantize=...)` besides plain fp32.
QUANTIZATIONS = ("fp16", "int8")


class ParityError(FacegenderError, ValueError):
    """onnxruntime and PyTorch disagree by more than the tolerance."""


# ----------------------------------------------------------------------------- parity and calibration images


def sample_images(
    prep, data: str | os.PathLike | None = None, count: int = 64, seed: int = 0, split: str = "test"
) -> tuple[list, str]:
    """Prepared uint8 crops (3, S, S) and where they came from: for the parity check (`split`
    "test") and int8 calibration ("train").

    With `data`: up to `count` images, evenly spread over the sorted files of DATASET/<split> (when
    `data` has that folder) or of `data` itself, prepared as in evaluation (aligned when the model
    was trained on aligned faces). Without: `count` seeded random images.
    """
    if data is None:
        rng = np.random.default_rng(seed)
        size = prep.image_size
        return [
            rng.integers(0, 256, (3, size, size), dtype=np.uint8) for _ in range(count)
        ], f"{count} synthetic random images"
    from facegender.core.images import expand_paths, load_image
    from facegender.core.preprocessing import ImagePreparer

    root = Path(data)
    if not root.is_dir():
        raise InputNotFoundError(f"--data {data}: folder not found")
    folder = root / split if (root / split).is_dir() else root
    files = expand_paths([folder])
    if not files:
        raise InputFileError(f"--data {data}: no image files in {folder}")
    picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(count, len(files)))})
    preparer = ImagePreparer(prep)
    return [preparer(load_image(files[i])) for i in picks], f"{len(picks)} images from {folder}"


def parity(reference, candidate, crops: Sequence) -> tuple[float, float]:
    """(largest |p_reference - p_candidate|, share of `crops` given the same class) for two
    `core.model.Model`s (calibrated probabilities, with the model's TTA). The candidate runs in
    uneven batches (13) and on a single image too, so that a fixed batch size in the exported graph
    would show."""
    p_ref = reference.classify(crops, batch_size=32)
    p_new = candidate.classify(crops, batch_size=13)
    single = candidate.classify(crops[:1])
    diff = float(max(np.abs(p_ref - p_new).max(), np.abs(p_ref[:1] - single).max()))
    return diff, float(np.mean(p_ref.argmax(1) == p_new.argmax(1)))


def quantize_int8(fp32_path: Path, out_path: Path, batches: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of an exported network (onnxruntime.quantization: QDQ format,
    per-channel int8 weights, uint8 activations, MinMax calibration on `batches` of normalised
    float32 images).

    `reduce_range` (7-bit weights) avoids the overflow of the uint8 x int8 products on CPUs without
    VNNI (AVX2 only): without it the bundled model lost 1.7 points on faces-ood, with it 0.3
    (`python benchmarks/predict_tradeoffs.py`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{INPUT_NAME: b} for b in batches])

        def get_next(self):
            return next(self.items, None)

    prepared = fp32_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up, as recommended
    quantize_static(
        str(prepared),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def store_weights_fp16(proto, min_elements: int = FP16_MIN_ELEMENTS) -> int:
    """Store the large float32 weights of an ONNX model (`proto`, changed in place) as float16: every
    float32 initializer of the main graph with more than `min_elements` elements becomes a float16
    initializer `<name>_fp16` followed by a `Cast(to=FLOAT)` node whose output is the original
    name, so the graph still computes in float32 and onnxruntime folds the casts into float32
    constants when the session is created. Initializers that are also graph inputs (overridable)
    and values beyond float16's range stay float32. Returns how many initializers were converted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | inputs
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) <= min_elements or init.name in inputs:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        if not np.all(np.abs(values) <= np.finfo(np.float16).max):  # would become inf (or is NaN)
            kept.append(init)
            continue
        name = f"{init.name}_fp16"
        while name in taken:
            name += "_"
        taken.add(name)
        kept.append(numpy_helper.from_array(values.astype(np.float16), name))
        casts.append(helper.make_node("Cast", [name], [init.name], name=f"{name}_cast", to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the casts first: the graph stays topologically sorted
    return len(casts)


# ----------------------------------------------------------------------------- export


def export_model(
    model,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float | None = None,
    parity_count: int = 64,
    log: Callable[[str], None] = print,
    source_name: str | None = None,
    head_only: bool = False,
    quantize: str | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_count: int = 256,
) -> dict[str, Any]:
    """Write the PyTorch network of `model` (a `core.model.Model` loaded from best_model.pth) to
    `out` (.onnx), check it, and compare it with PyTorch (`facegender.export`, `facegender export`).
    `source_name` (default: the model file's name) goes in the metadata as `source_model`.

    `head_only`: write only the head (for a body kept at pretrained package weights; see the module
    docstring). `quantize="int8"`: static int8 quantization, calibrated on `calibration_count`
    images of `calibration` (DATASET, its train/ is used, or any image folder; required).
    `quantize="fp16"`: float16 weights, float32 arithmetic (`store_weights_fp16`); no calibration.

    The file is written through a temporary file and only replaces `out` when `onnx.checker`
    passes and the largest probability difference on the parity images is at most `tolerance`
    (default DEFAULT_TOLERANCE, FP16_TOLERANCE for fp16, INT8_TOLERANCE for int8; ParityError
    otherwise). The file's metadata says `quantization` (fp16 or int8) when it is not plain fp32.
    Returns {'out', 'parity_max_abs_diff', 'parity_agreement', 'parity_images', 'opset', 'bytes',
    'quantization', ...}.
    """
    import onnx  # noqa: F401  (first: without the package the export fails before any work)

    out = Path(out)
    quantize = _export_request(model, out, head_only, quantize, calibration)
    record = model.info
    body = _pretrained_body(record) if head_only else None
    if tolerance is None:
        tolerance = {"int8": INT8_TOLERANCE, "fp16": FP16_TOLERANCE}.get(quantize, DEFAULT_TOLERANCE)
    crops, source = sample_images(model.prep, data, parity_count)
    graph = _graph_to_export(model, body)

    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / "fp32.onnx" if quantize == "int8" else tmp
        _torch_to_onnx(graph, fp32, opset)
        if quantize == "int8":
            _quantize_calibrated(model, fp32, tmp, calibration, calibration_count, log)
        source_name = source_name or Path(model.info.get("path", "")).name or None
        _finish_file(tmp, model, graph, quantize, body, source_name, log)
        diff, agree = _check_parity(model, tmp, crops, source, tolerance, source_name, out, log)
    return _exported(out, record, opset, bool(body), quantize, (diff, agree, source), log)


def _exported(
    out: Path,
    record: dict,
    opset: int,
    head_only: bool,
    quantize: str | None,
    parity: tuple,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """export_model's one-line log and its result, for the file just written."""
    diff, agree, source = parity
    log(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, opset {opset}, dynamic batch, "
        f"{record['backbone']}{' head only' if head_only else ''}{f', {quantize}' if quantize else ''}, "
        f"classes {record['classes']})"
    )
    return {
        "out": str(out),
        "parity_max_abs_diff": diff,
        "parity_agreement": agree,
        "parity_images": source,
        "opset": opset,
        "backbone": record["backbone"],
        "classes": record["classes"],
        "bytes": out.stat().st_size,
        "head_only": head_only,
        "quantization": quantize or "fp32",
    }


def _export_request(model, out: Path, head_only: bool, quantize: str | None, calibration) -> str | None:
    """Check what `export_model` is asked for before any work; the quantization (None: plain fp32)."""
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    if getattr(model.backend, "module", None) is None:
        raise CheckpointError("only a PyTorch model (best_model.pth) can be exported to ONNX")
    if quantize == "fp32":
        quantize = None
    if quantize not in (None, *QUANTIZATIONS):
        raise ConfigError(f"--quantize {quantize}: only {' or '.join(QUANTIZATIONS)} is supported")
    if quantize and head_only:
        raise ConfigError(
            f"--quantize {quantize} stores the whole network smaller; it cannot be combined with --head-only"
        )
    if quantize == "int8" and calibration is None:
        raise ConfigError("--quantize int8 needs --calibration DATASET: training images to calibrate on")
    return quantize


@dataclass
class _Graph:
    """What `export_model` traces: the module, its input and output names, an example input, and
    the input's description for the file's doc string."""

    module: Any
    names: tuple[str, str]
    example: Any
    shape: str


def _graph_to_export(model, body: dict | None) -> _Graph:
    """The whole network on normalised images, or (head-only, `body`) its head on the body's embeddings."""
    import torch

    network, record, size = model.backend.module, model.info, model.prep.image_size
    device = next(network.parameters()).device
    if body:
        example = torch.zeros(2, _head_inputs(network.head), device=device)
        return _Graph(
            network.head,
            (BODY_OUTPUT_NAME, OUTPUT_NAME),
            example,
            f"{BODY_OUTPUT_NAME} (N, {example.shape[1]}) of the pretrained {record['backbone']} body",
        )
    return _Graph(
        network,
        (INPUT_NAME, OUTPUT_NAME),
        torch.zeros(2, 3, size, size, device=device),
        f"normalised RGB float32 (N, 3, {size}, {size})",
    )


def _torch_to_onnx(graph: _Graph, path: Path, opset: int) -> None:
    """torch.onnx.export with the TorchScript exporter, a dynamic batch axis and constant folding."""
    import torch

    names = graph.names
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is the legacy one, and about constant folding.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            graph.module,
            (graph.example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
            do_constant_folding=True,
        )


def _quantize_calibrated(model, fp32: Path, out: Path, calibration, count: int, log: Callable[[str], None]) -> None:
    """`quantize_int8` of the fp32 file into `out`, calibrated on `count` training images of `calibration`."""
    calib, calib_source = sample_images(model.prep, calibration, count, split="train")
    batches = [model.normalize(calib[i : i + 32]) for i in range(0, len(calib), 32)]
    quantize_int8(fp32, out, batches)
    log(f"quantized to int8, calibrated on {calib_source}")


def _finish_file(
    path: Path,
    model,
    graph: _Graph,
    quantize: str | None,
    body: dict | None,
    source_name: str | None,
    log: Callable[[str], None],
) -> None:
    """Rewrite the exported file at `path`: float16 weights (fp16), doc string and metadata, after
    a full `onnx.checker` check."""
    import onnx

    record = model.info
    proto = onnx.load(str(path))
    if quantize == "fp16":
        converted = store_weights_fp16(proto)
        log(f"stored {converted} weight tensors as float16 (computed in float32)")
    proto.doc_string = f"facegender {record['backbone']} classifier: {graph.shape} -> logits over {record['classes']}"
    extra = {"source_model": source_name} if source_name else {}
    if body:
        extra["body"] = body
    if quantize:
        extra["quantization"] = quantize
    for key, value in onnx_metadata({**record, "temperature": model.temperature, "tta": model.tta}, **extra).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _check_parity(
    model,
    path: Path,
    crops: Sequence,
    source: str,
    tolerance: float,
    source_name: str | None,
    out: Path,
    log: Callable[[str], None],
) -> tuple[float, float]:
    """`parity` of the file at `path` (run as predict runs it) with `model`; ParityError above
    `tolerance`. (largest probability difference, share of the same class)."""
    from facegender.core.preprocessing import Preprocessing

    backend, meta = load_onnx_classifier(path)
    candidate = type(model)(
        meta["classes"],
        Preprocessing.from_dict(meta["preprocessing"]),
        backend,
        temperature=meta["temperature"],
        tta=meta["tta"],
        detect=False,
    )
    diff, agree = parity(model, candidate, crops)
    log(
        f"parity on {source}: max |p_onnx - p_torch| = {diff:.2e} (tolerance {tolerance:g}), same class for {agree:.1%}"
    )
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"{source_name or 'the model'}: the ONNX model's probabilities differ from PyTorch's "
            f"by {diff:.3g} (more than {tolerance:g}); {out} was not written. Try another --opset, "
            "or report the backbone as not exportable."
        )
    return diff, agree


def _pretrained_body(record: dict) -> dict[str, Any]:
    """The `body` metadata entry of a head-only file; ValueError when the body was trained (stored)."""
    if record.get("body_weights") != "pretrained" or record.get("backbone") != "dlib_resnet":
        raise ConfigError(
            f"--head-only: this model's body ({record.get('backbone')}) was trained or is not dlib's "
            "face-recognition network from face_recognition_models; export the whole model"
        )
    from facegender.core import dlib_onnx

    return {
        "backbone": "dlib_resnet",
        "weights": dlib_onnx.WEIGHTS_FILENAME,
        "weights_sha256": dlib_onnx.WEIGHTS_SHA256,
        "package": "face_recognition_models==0.3.0",
    }


def _head_inputs(head) -> int:
    """Input width of a head (its first Linear layer)."""
    import torch

    return next(m for m in head.modules() if isinstance(m, torch.nn.Linear)).in_features
