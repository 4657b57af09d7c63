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
(`export_model`, called by `inference.Model.export` and so by `facegender export`).

`OnnxBackend` runs such a file for `inference.Model` (and so for `predict` and `serve`):
`facegender.load("model.onnx")` works like `facegender.load("best_model.pth")`. This module imports
neither torch nor the rest of facegender at import time: the ONNX path is meant to run without
PyTorch one day (torch is imported only to write a file, `checkpoint` only to raise its errors).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

#: metadata_props key that marks a facegender ONNX file, with its format version as value.
FORMAT_KEY = "facegender_format"
FORMAT = "facegender-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
#: What goes from the checkpoint record into the ONNX metadata (each value as JSON).
METADATA_KEYS = ("classes", "preprocessing", "temperature", "tta", "backbone", "metrics", "pretrained",
                 "weights_source", "epoch")


class ParityError(ValueError):
    """onnxruntime and PyTorch disagree by more than the tolerance."""


def _error(message: str) -> Exception:
    """checkpoint.CheckpointError (what the command line reports as a problem with the input)."""
    from facegender.checkpoint import CheckpointError

    return CheckpointError(message)


# ----------------------------------------------------------------------------- metadata

def onnx_metadata(record: dict, **extra: Any) -> dict[str, str]:
    """The metadata_props of an exported model: record fields (and `extra`) as JSON strings."""
    meta = {FORMAT_KEY: FORMAT}
    values = {k: record[k] for k in METADATA_KEYS if k in record}
    values.setdefault("temperature", 1.0)
    values.setdefault("tta", False)
    values.update(extra)
    for key, value in values.items():
        meta[key] = json.dumps(value, ensure_ascii=False, default=float)
    return meta


def read_metadata(model_proto, path: str | os.PathLike) -> dict[str, Any]:
    """The metadata written by `onnx_metadata`, decoded; CheckpointError when it is not ours."""
    raw = {p.key: p.value for p in model_proto.metadata_props}
    if raw.get(FORMAT_KEY) != FORMAT:
        raise _error(f"{path}: not an ONNX file made by `facegender export` (no {FORMAT_KEY}={FORMAT} in its "
                     "metadata); export the model with `facegender export --model best_model.pth --out model.onnx`")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key == FORMAT_KEY:
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise _error(f"{path}: metadata field {key!r} is not valid JSON; re-export the model") from None
    missing = [k for k in ("classes", "preprocessing") if k not in meta]
    if missing:
        raise _error(f"{path}: metadata lacks {', '.join(missing)}; re-export the model")
    meta.setdefault("temperature", 1.0)
    meta.setdefault("tta", False)
    meta["format"] = FORMAT
    return meta


# ----------------------------------------------------------------------------- running

def onnx_session(source: str | os.PathLike | bytes, threads: int | None = None):
    """An onnxruntime CPU session. `threads` intra-op threads (default: the CPU count, at most 4, so
    that a few concurrent server requests do not oversubscribe the cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or min(4, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads must sleep, not spin: a spinning pool steals the cores from the next stage
    # (PyTorch, or the other session of face detection + classification) and made end-to-end
    # prediction about 2x slower on a 2-core CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                providers=["CPUExecutionProvider"])


class OnnxBackend:
    """The classifier of an exported file on onnxruntime: `logits(batch)` takes a normalised float
    batch (N, 3, S, S) (numpy, or anything with `.numpy()`) and returns numpy float32 logits (N, C).
    The session is thread-safe, so one backend serves concurrent requests. Always fp32."""

    runtime = "onnxruntime"
    precision = "fp32"

    def __init__(self, session):
        self.session = session

    def logits(self, batch) -> np.ndarray:
        if not isinstance(batch, np.ndarray) and hasattr(batch, "numpy"):
            batch = batch.detach().cpu().numpy()  # a torch tensor
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    __call__ = logits


def load_onnx_classifier(path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxBackend, dict[str, Any]]:
    """(backend, meta) for an exported model. The backend is also callable as a logits function;
    meta has the checkpoint record's keys that `inference.Model` needs (classes, preprocessing,
    temperature, tta) and backbone, metrics."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise _error(f"{path}: ONNX model file not found; make one with `facegender export`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for damaged files
        raise _error(f"{path}: cannot be read as an ONNX model ({exc.__class__.__name__}: {exc})") from None
    meta = read_metadata(proto, path)
    del proto
    return OnnxBackend(onnx_session(path, threads)), meta


# ----------------------------------------------------------------------------- parity images

def parity_images(prep, data: str | os.PathLike | None = None, count: int = 64, seed: int = 0) -> tuple[list, str]:
    """Prepared uint8 crops (3, S, S) for the parity check, and where they came from.

    With `data`: up to `count` images, evenly spread over the sorted files of DATASET/test (when
    `data` has a test/ folder) or of `data` itself, prepared as in evaluation (aligned when the
    model was trained on aligned faces). Without: `count` seeded random images.
    """
    import torch

    if data is None:
        gen = torch.Generator().manual_seed(seed)
        size = prep.image_size
        return [torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8)
                for _ in range(count)], f"{count} synthetic random images"
    from facegender.images import expand_paths, load_image
    from facegender.transforms import ImagePreparer

    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: folder not found")
    folder = root / "test" if (root / "test").is_dir() else root
    files = expand_paths([folder])
    if not files:
        raise ValueError(f"--data {data}: no image files in {folder}")
    picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(count, len(files)))})
    preparer = ImagePreparer(prep)
    return [preparer(load_image(files[i])) for i in picks], f"{len(picks)} images from {folder}"


def max_probability_difference(reference, candidate, crops: Sequence) -> float:
    """Largest |p_reference - p_candidate| over `crops` for two `inference.Model`s (calibrated
    probabilities, with the model's TTA). The candidate runs in uneven batches (13) and on a single
    image too, so that a fixed batch size in the exported graph would show."""
    p_ref = reference.classify(crops, batch_size=32)
    p_new = candidate.classify(crops, batch_size=13)
    single = candidate.classify(crops[:1])
    return float(max(np.abs(p_ref - p_new).max(), np.abs(p_ref[:1] - single).max()))


# ----------------------------------------------------------------------------- export

def export_model(model, out: str | os.PathLike, data: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET,
                 tolerance: float = DEFAULT_TOLERANCE, parity_count: int = 64, log: Callable[[str], None] = print,
                 source_name: str | None = None) -> dict[str, Any]:
    """Write the PyTorch network of `model` (an `inference.Model` loaded from best_model.pth) to `out`
    (.onnx), check it, and compare it with PyTorch (see `inference.Model.export`).

    The file is written through a temporary file and only replaces `out` when `onnx.checker`
    passes and the largest probability difference on the parity images is at most `tolerance`
    (ParityError otherwise). Returns {'out', 'parity_max_abs_diff', 'parity_images', 'opset', ...}.
    """
    import onnx
    import torch

    from facegender.checkpoint import atomic_path
    from facegender.transforms import Preprocessing

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: the file name must end in .onnx")
    network = getattr(model.backend, "module", None)
    if network is None:
        raise ValueError("only a PyTorch model (best_model.pth) can be exported to ONNX")
    record = model.info
    size = model.prep.image_size
    crops, source = parity_images(model.prep, data, parity_count)

    with atomic_path(out) as tmp:
        example = torch.zeros(2, 3, size, size, device=next(network.parameters()).device)
        with warnings.catch_warnings():
            # The TorchScript exporter warns that it is the legacy one, and about constant folding.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(network, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
        proto = onnx.load(str(tmp))
        proto.doc_string = (f"facegender {record['backbone']} classifier: normalised RGB float32 "
                            f"(N, 3, {size}, {size}) -> logits over {record['classes']}")
        extra = {"source_model": source_name} if source_name else {}
        for key, value in onnx_metadata({**record, "temperature": model.temperature, "tta": model.tta},
                                        **extra).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        del proto

        backend, meta = load_onnx_classifier(tmp)
        candidate = type(model)(meta["classes"], Preprocessing.from_dict(meta["preprocessing"]), backend,
                                temperature=meta["temperature"], tta=meta["tta"], detect=False)
        diff = max_probability_difference(model, candidate, crops)
        log(f"parity on {source}: max |p_onnx - p_torch| = {diff:.2e} (tolerance {tolerance:g})")
        if not diff <= tolerance:  # also catches NaN
            raise ParityError(f"{source_name or 'the model'}: the ONNX model's probabilities differ from PyTorch's "
                              f"by {diff:.3g} (more than {tolerance:g}); {out} was not written. Try another --opset, "
                              "or report the backbone as not exportable.")
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {opset}, dynamic batch, "
        f"{record['backbone']}, classes {record['classes']})")
    return {"out": str(out), "parity_max_abs_diff": diff, "parity_images": source, "opset": opset,
            "backbone": record["backbone"], "classes": record["classes"], "bytes": out.stat().st_size}
