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
(`training.export.export_model`, called by `facegender.export` and so by `facegender export`).

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

`OnnxBackend` runs such a file for `core.model.Model` (and so for `predict`, `evaluate` and
`serve`): `facegender.load("model.onnx")` works like `facegender.load("best_model.pth")`. Reading
and running a file needs onnxruntime and numpy only: no torch and no `onnx` package (the metadata
is read through onnxruntime). torch and onnx are imported only to write a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from facegender.core.files import CheckpointError

#: metadata_props key that marks a facegender ONNX file, with its format version as value.
FORMAT_KEY = "facegender_format"
FORMAT = "facegender-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Input of a head-only file: the body's output.
BODY_OUTPUT_NAME = "embedding"
#: What goes from the checkpoint record into the ONNX metadata (each value as JSON).
METADATA_KEYS = (
    "classes",
    "preprocessing",
    "temperature",
    "tta",
    "backbone",
    "metrics",
    "pretrained",
    "weights_source",
    "epoch",
    "threshold",
    "uncertain_band",
)
#: Metadata a file may carry besides METADATA_KEYS (see export_model).
EXTRA_KEYS = ("source_model", "body", "quantization")


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


def read_metadata(raw: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """The metadata written by `onnx_metadata` (`raw`: the file's metadata_props as a dict),
    decoded; CheckpointError when it is not ours."""
    if raw.get(FORMAT_KEY) != FORMAT:
        raise CheckpointError(
            f"{path}: not an ONNX file made by `facegender export` (no {FORMAT_KEY}={FORMAT} in "
            "its metadata); export the model with `facegender export --model best_model.pth --out "
            "model.onnx`"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in METADATA_KEYS + EXTRA_KEYS:
            continue  # not ours (e.g. the quantizer's own entries)
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: metadata field {key!r} is not valid JSON; re-export the model") from None
    missing = [k for k in ("classes", "preprocessing") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}; re-export the model")
    meta.setdefault("temperature", 1.0)
    meta.setdefault("tta", False)
    meta["format"] = FORMAT
    return meta


# ----------------------------------------------------------------------------- running


def onnx_session(source: str | os.PathLike | bytes, threads: int | None = None, *, arena: bool = True):
    """An onnxruntime CPU session: every session of facegender (classifier, pretrained body, face
    detector) comes from here. `threads` intra-op threads (default: the CPU count, at most 4, so
    that a few concurrent server requests do not oversubscribe the cores); all graph
    optimisations; idle threads sleep instead of spinning. `arena=False` turns off onnxruntime's
    CPU memory arena, which otherwise keeps the largest batch's buffers for the session's lifetime
    (a long-running server can trade a little speed for bounded memory)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or min(4, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = bool(arena)
    # Idle worker threads must sleep, not spin: a spinning pool steals the cores from the next stage
    # (PyTorch, or the other session of face detection + classification) and made end-to-end
    # prediction about 2x slower on a 2-core CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        source if isinstance(source, bytes) else str(source), options, providers=["CPUExecutionProvider"]
    )


class OnnxBackend:
    """The classifier of an exported file on onnxruntime: `logits(batch)` takes a normalised float
    batch (N, 3, S, S) (numpy, or anything with `.numpy()`) and returns numpy float32 logits (N, C).
    With a `body` session (head-only files) the batch goes through the body, then the head. The
    sessions are thread-safe, so one backend serves concurrent requests. `precision`: what the
    network computes in, fp32, or int8 for an int8 file (a file with fp16 weights computes in
    fp32); `quantization`: how the file stores it (fp32, fp16 or int8)."""

    runtime = "onnxruntime"

    def __init__(self, session, body=None, precision: str = "fp32", quantization: str | None = None):
        self.session = session
        self.body = body
        self.precision = precision
        self.quantization = quantization or precision

    def logits(self, batch) -> np.ndarray:
        if not isinstance(batch, np.ndarray) and hasattr(batch, "numpy"):
            batch = batch.detach().cpu().numpy()  # a torch tensor
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self.body is not None:
            x = self.body.run([BODY_OUTPUT_NAME], {INPUT_NAME: x})[0]
            return self.session.run([OUTPUT_NAME], {BODY_OUTPUT_NAME: x})[0]
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    __call__ = logits


def body_model_path(body: dict[str, Any], image_size: int, path: str | os.PathLike) -> Path:
    """The ONNX file of the pretrained body that a head-only file names in its metadata (built
    from the installed package's weights on first use, then cached)."""
    from facegender.core import dlib_onnx

    if body.get("backbone") != "dlib_resnet":
        raise CheckpointError(
            f"{path}: its body {body.get('backbone')!r} cannot be rebuilt without PyTorch (only "
            "dlib_resnet can); export the model whole, without --head-only"
        )
    if body.get("weights_sha256") != dlib_onnx.WEIGHTS_SHA256:
        raise CheckpointError(
            f"{path}: it was trained on dlib weights with sha256 {body.get('weights_sha256')}, not "
            "those of face_recognition_models==0.3.0; export the model whole, without --head-only"
        )
    try:
        return dlib_onnx.body_onnx_path(image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: this model runs on dlib's face-recognition network, which could not be loaded: {exc}"
        ) from None


def load_onnx_classifier(
    path: str | os.PathLike, threads: int | None = None, arena: bool = True
) -> tuple[OnnxBackend, dict[str, Any]]:
    """(backend, meta) for an exported model. The backend is also callable as a logits function;
    meta has the checkpoint record's keys that `core.model.Model` needs (classes, preprocessing,
    temperature, tta) and backbone, metrics. `arena`: onnxruntime's CPU memory arena (`onnx_session`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model file not found; make one with `facegender export`")
    try:
        session = onnx_session(path, threads, arena=arena)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for damaged files
        raise CheckpointError(
            f"{path}: cannot be read as an ONNX model ({exc.__class__.__name__}: {str(exc).strip()[:300]})"
        ) from None
    meta = read_metadata(dict(session.get_modelmeta().custom_metadata_map), path)
    body = None
    if meta.get("body"):
        body = onnx_session(
            body_model_path(meta["body"], int(meta["preprocessing"]["image_size"]), path), threads, arena=arena
        )
    stored = meta.get("quantization") or "fp32"
    return OnnxBackend(session, body, "int8" if stored == "int8" else "fp32", stored), meta
