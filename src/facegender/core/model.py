"""One loaded model for every command: `load(path) -> Model`.

A `Model` holds what a prediction needs, read once from best_model.pth or an exported .onnx: the
model record (classes, preprocessing, face stage, temperature, test-time augmentation) and a
backend that turns a normalised float batch (N, 3, S, S) into logits (N, C):

- `onnx_model.OnnxBackend`: the exported network on onnxruntime;
- `training.torch_backend.TorchBackend`: the PyTorch network of a best_model.pth at one precision
  (fp32 unless asked otherwise), the only part that needs torch (`pip install 'facegender[train]'`).
- any callable `batch -> logits` (tests, benchmarks) is wrapped as a backend.

Backends take and return numpy arrays. torch is imported only by the PyTorch backend: an exported
model predicts, evaluates and serves with onnxruntime, numpy and Pillow alone (preprocessing is
`core.preprocessing.normalize`, face detection `core.faces.detect.FaceDetector`, both numpy).

What a Model does:
- `predict(items)`: faces, labels and calibrated probabilities for image files, folders, PIL
  images or bytes, read and classified a batch of images at a time (bounded memory), results in
  input order, an unreadable file as an error in its place: a `results.PhotoResult` per image, with
  a `results.Face` per face (`to_dict()`: the JSON form of `predict --json` and the HTTP API);
- `classify(crops)` / `logits(batch)`: probabilities / logits of prepared crops or a batch;
- `decide(probs)`: the one decision from calibrated probabilities to classes, for every command:
  with two classes and a `threshold` (the record's, chosen on validation to equalise the two
  recalls, or `load(..., threshold=T)`), classes[1] when its probability is >= threshold, else the
  arg-max; `is_uncertain(probs)`: the `uncertain` flag (within `uncertain_band` of the threshold);

Evaluating a labelled folder is `evaluation.predictions.predict_labelled(model, folder)`; writing
an ONNX file is `training.export.export_model(model, out)`.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facegender.core.decision import DEFAULT_UNCERTAIN_BAND, apply_temperature, check_threshold, decide, uncertain_mask
from facegender.core.errors import ConfigError
from facegender.core.images import DEFAULT_MAX_PIXELS, ImageError, expand_paths, iter_paths, load_image
from facegender.core.onnx_model import load_onnx_classifier
from facegender.core.preprocessing import Preprocessing, normalize
from facegender.core.resources import default_model_path  # the model `load()` uses without a path
from facegender.core.results import NO_FACE, UNCERTAIN, Face, PhotoResult

#: The precision of inference unless a command is told otherwise.
DEFAULT_PRECISION = "fp32"
#: `--fast` (predict, serve): no landmark refinement, no flip TTA. About 2x the photos per second of
#: the trained settings for the bundled model, for 2 points less on faces-ood (not significant on
#: its 350 photos) and 0.5 more on faces-gdf/test (benchmarks/predict_tradeoffs.py, docs/benchmarks.md).
FAST = {"refine_steps": 0, "tta": False}

__all__ = ["Model", "load", "default_model_path", "UNCERTAIN", "NO_FACE", "FAST", "expand_paths", "Face", "PhotoResult"]


class FunctionBackend:
    """Any `batch -> logits` callable as a backend."""

    runtime = "function"
    precision = "fp32"

    def __init__(self, fn: Callable):
        self.logits = self.__call__ = fn


def as_backend(backend):
    return backend if hasattr(backend, "logits") else FunctionBackend(backend)


# ----------------------------------------------------------------------------- the model


@dataclass
class _Crop:
    pixels: np.ndarray  # uint8 (3, S, S)
    box: list[float]
    landmarks: list[list[float]] | None
    detection_score: float | None


class Model:
    """A loaded classifier: classifies faces in files, PIL images or bytes, evaluates labelled
    folders, exports. Safe to reuse across calls and threads; holds no per-request state."""

    def __init__(
        self,
        classes: Sequence[str],
        prep: Preprocessing,
        backend,
        temperature: float = 1.0,
        tta: bool = False,
        detect: bool | None = None,
        min_confidence: float | None = None,
        batch_size: int = 32,
        info: dict | None = None,
        threads: int | None = None,
        refine_steps: int | None = None,
        workers: int | None = None,
        threshold: float | None = None,
        uncertain_band: float = DEFAULT_UNCERTAIN_BAND,
        arena: bool = True,
    ):
        """`backend`: `TorchBackend`, `onnx_model.OnnxBackend` or a `batch -> logits` callable.
        `detect=False`: every image is one already-cropped face. `threads`: ONNX Runtime threads of
        the face detector (None: the runtime's default). `refine_steps`: landmark refinement rounds,
        instead of the trained face stage's (fewer is faster; see benchmarks/predict_tradeoffs.py).
        `workers`: images decoded, detected and aligned at once, in threads (default: the CPU
        count, at most 4); the faces of all images of a batch then go through the classifier
        together. `threshold`: the decision threshold on the probability of classes[1] (two classes
        only; None: the arg-max); `uncertain_band`: faces whose probability is closer than this to
        the threshold (0.5 without one) are flagged `uncertain` (see `decide`). `arena`: the face
        detector's onnxruntime memory arena (`onnx_model.onnx_session`)."""
        self.classes = list(classes)
        self.threshold = threshold
        if not float(uncertain_band) >= 0:
            raise ConfigError(f"uncertain_band must be >= 0, got {uncertain_band}")
        self.uncertain_band = float(uncertain_band)
        self.prep = prep
        self.backend = as_backend(backend)
        self.temperature = float(temperature)
        self.tta = bool(tta)
        self.min_confidence = min_confidence
        self.batch_size = batch_size
        self.workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
        self.info = info or {}
        self.face_config = None
        self.detector = None
        if prep.face is not None:
            from facegender.core.faces.detect import FaceDetector

            self.face_config = copy.copy(prep.face_config)  # its own: refine_steps may differ
            if refine_steps is not None:
                self.face_config.refine_steps = int(refine_steps)
            if detect is not False:
                self.detector = FaceDetector(self.face_config, threads=threads, arena=arena)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> Model:
        """`load(path, **kwargs)`."""
        return load(path, **kwargs)

    @property
    def record(self) -> dict:
        """The model record (best_model.pth without weights, or the ONNX metadata)."""
        return self.info

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the probability of classes[1]; None (the arg-max) for models
        without two classes."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = check_threshold(value) if len(self.classes) == 2 else None

    @property
    def precision(self) -> str:
        return getattr(self.backend, "precision", DEFAULT_PRECISION)

    @property
    def runtime(self) -> str:
        return getattr(self.backend, "runtime", "function")

    @property
    def logits_fn(self):
        """The backend's `batch -> logits` function (assigning a function replaces the backend)."""
        return self.backend.logits

    @logits_fn.setter
    def logits_fn(self, fn) -> None:
        self.backend = as_backend(fn)

    def replace(self, **changes: Any) -> Model:
        """A copy with other attributes (e.g. `tta=False`); the backend and detector are shared."""
        other = copy.copy(self)
        for key, value in changes.items():
            if not hasattr(other, key):
                raise AttributeError(f"Model has no attribute {key!r}")
            setattr(other, key, value)
        return other

    # ------------------------------------------------------------------ logits and probabilities

    def logit_views(self, batch, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits of `batch`, logits of its mirror images or None): with TTA, the images and their
        mirrors go through the network in one run. `batch`: normalised float (N, 3, S, S)."""
        tta = self.tta if tta is None else tta
        batch = batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)
        if not tta:
            return np.asarray(self.backend.logits(batch), dtype=np.float32), None
        both = np.asarray(self.backend.logits(np.concatenate([batch, batch[..., ::-1]])), dtype=np.float32)
        return both[: len(batch)], both[len(batch) :]

    def logits(self, batch, tta: bool | None = None) -> np.ndarray:
        """Logits (N, C) of a normalised batch; with TTA the mean of the image's and its mirror's."""
        plain, mirrored = self.logit_views(batch, tta)
        return plain if mirrored is None else (plain + mirrored) / 2

    def probabilities(self, logits) -> np.ndarray:
        """Calibrated class probabilities: softmax(logits / temperature), float64."""
        return apply_temperature(logits, self.temperature)

    def decide(self, probs) -> np.ndarray:
        """Predicted class indices (N,) of calibrated probabilities (N, C): the one decision of
        every command (`decision.decide` at this model's `threshold`)."""
        return decide(probs, self.threshold)

    def is_uncertain(self, probs) -> np.ndarray:
        """The `uncertain` flag (bool (N,)) of calibrated probabilities (`decision.uncertain_mask`)."""
        return uncertain_mask(probs, self.threshold, self.uncertain_band)

    def normalize(self, crops: Sequence) -> np.ndarray:
        """Normalised float32 batch (N, 3, S, S) of prepared uint8 crops (3, S, S) (numpy, or
        tensors)."""
        return normalize(np.stack([np.asarray(c) for c in crops]), self.prep)

    def classify(self, crops: Sequence, batch_size: int | None = None) -> np.ndarray:
        """Calibrated class probabilities (N, C) for prepared uint8 crops (3, S, S), in batches."""
        size = batch_size or self.batch_size
        out = [self.logits(self.normalize(crops[start : start + size])) for start in range(0, len(crops), size)]
        if not out:
            return np.zeros((0, len(self.classes)))
        return self.probabilities(np.concatenate(out))

    # ------------------------------------------------------------------ faces in images

    def _crops(self, image: Image.Image) -> list[_Crop]:
        """The prepared face crops of one RGB image: every detected face aligned, or the whole
        image as one face (a model without a face stage, or `detect=False`)."""
        full_box = [0.0, 0.0, float(image.width), float(image.height)]
        if self.face_config is None:
            return [_Crop(self.prep.resize(image), full_box, None, None)]
        from facegender.core.faces.align import align_face, fallback_crop

        if self.detector is None:  # --no-detect on an aligned model: centre the crop as in training
            return [_Crop(self.prep.resize(fallback_crop(image, self.face_config)), full_box, None, None)]
        return [
            _Crop(
                self.prep.resize(align_face(image, f.landmarks, self.face_config)),
                [float(v) for v in f.box],
                f.landmarks.tolist(),
                float(f.score),
            )
            for f in self.detector.detect(image)
        ]

    def _face_result(self, crop: _Crop, probs: np.ndarray) -> Face:
        """One face: its label (`decide`; `uncertain` below `min_confidence`), the probability of
        that label, every class's probability and the `uncertain` flag, rounded as reported."""
        best = int(self.decide(probs[None])[0])
        label = self.classes[best]
        confident = self.min_confidence is None or probs[best] >= self.min_confidence
        return Face(
            box=tuple(round(v, 1) for v in crop.box),
            landmarks=tuple((round(x, 1), round(y, 1)) for x, y in crop.landmarks) if crop.landmarks else None,
            detection_score=None if crop.detection_score is None else round(crop.detection_score, 4),
            label=label if confident else UNCERTAIN,
            predicted_class=label,
            probability=round(float(probs[best]), 6),
            probabilities={c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            uncertain=bool(self.is_uncertain(probs[None])[0]),
        )

    def predict_images(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces (largest first) for each PIL image; an empty list means no face was found."""
        return [r.faces for r in self.predict_iter(images)]

    def _classify_crops(self, crops_per_image: list[list[_Crop]]) -> list[list[Face]]:
        """The crops of a batch of images through the classifier at once; the faces of each image."""
        probs = iter(self.classify([c.pixels for crops in crops_per_image for c in crops]))
        return [[self._face_result(c, next(probs)) for c in crops] for crops in crops_per_image]

    def _prepare(self, source: tuple[str, Any], max_pixels: int) -> tuple[PhotoResult, list[_Crop]]:
        """Read one image and make its face crops: (result so far, without faces; crops)."""
        name, src = source
        try:
            im = src if isinstance(src, Image.Image) else load_image(src, max_pixels=max_pixels, name=name)
        except ImageError as exc:
            return PhotoResult(name, error=str(exc)), []
        im = im if im.mode == "RGB" else im.convert("RGB")
        return PhotoResult(name, width=im.width, height=im.height), self._crops(im)

    def predict_iter(
        self, items: Iterable[Any], batch_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> Iterator[PhotoResult]:
        """One `PhotoResult` per image, in input order, classifying the faces of `batch_size` images
        at a time. Items (any iterable, consumed as the work goes, never listed first): file paths
        and folders (walked lazily for image files), PIL images, bytes, or (name,
        path-or-bytes-or-image) pairs. A file that cannot be read gets its `error` (`status`
        "error"), and the others go on; an image without a face gets no `faces` (`status` "no face
        found").

        Images are decoded, detected and aligned in `workers` threads, working ahead by one batch:
        while the faces of one batch go through the classifier, the next batch is being prepared
        (on 2 cores that keeps both busy). At most two batches are in memory, as crops."""
        size = batch_size or self.batch_size
        sources = _sources(items)
        head = list(itertools.islice(sources, 2))
        sources = itertools.chain(head, sources)
        if self.workers == 1 or len(head) < 2:  # one image: no threads to start
            while chunk := list(itertools.islice(sources, size)):
                yield from self._finish([self._prepare(source, max_pixels) for source in chunk])
            return
        with ThreadPoolExecutor(self.workers) as pool:
            pending: list[Future] = []
            for source in sources:
                pending.append(pool.submit(self._prepare, source, max_pixels))
                if len(pending) == 2 * size:
                    yield from self._finish([f.result() for f in pending[:size]])
                    pending = pending[size:]
            while pending:
                yield from self._finish([f.result() for f in pending[:size]])
                pending = pending[size:]

    def _finish(self, prepared: list[tuple[PhotoResult, list[_Crop]]]) -> list[PhotoResult]:
        """Classify the crops of a batch of prepared images; their results, in order."""
        results, crops = zip(*prepared)
        for r, faces in zip(results, self._classify_crops(list(crops))):
            r.faces = faces  # none for a file that could not be read
        return list(results)

    def predict(
        self, items: Any, batch_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> list[PhotoResult]:
        """`predict_iter` as a list; one item (a path, an image) may be passed without a list."""
        if isinstance(items, (str, os.PathLike, bytes, Image.Image)):
            items = [items]
        return list(self.predict_iter(items, batch_size, max_pixels))

    def predict_sources(
        self, sources: Sequence[tuple[str, Any]], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> list[PhotoResult]:
        """Results for (name, path-or-bytes) pairs (see `predict_iter`)."""
        return list(self.predict_iter(sources, max_pixels=max_pixels))

    def predict_paths(self, paths: Iterable[str | os.PathLike]) -> list[PhotoResult]:
        return list(self.predict_iter(paths))


def _sources(items: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """(name, source) for each input of `predict_iter`, taken one at a time (`items` may be any
    iterator, never counted or listed); folders expand to their image files as they are walked."""
    for n, item in enumerate(items):
        if isinstance(item, tuple):
            yield str(item[0]), item[1]
        elif isinstance(item, Image.Image):
            yield getattr(item, "filename", "") or f"image {n + 1}", item
        elif isinstance(item, bytes):
            yield f"image {n + 1}", item
        else:
            for path in iter_paths([item]):  # a folder is walked lazily
                yield str(path), path


# ----------------------------------------------------------------------------- loading


def load(
    path: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = DEFAULT_PRECISION,
    threads: int | None = None,
    arena: bool = True,
    **kwargs: Any,
) -> Model:
    """The model at `path`: best_model.pth (PyTorch, on `device` at `precision`) or an exported .onnx
    (onnxruntime, `threads` threads); None: the bundled default model (`default_model_path`).
    `arena=False`: no onnxruntime CPU memory arena in its sessions (bounded memory for a server).
    Keyword arguments of `Model` (tta, detect, min_confidence, batch_size, refine_steps, threshold,
    uncertain_band) override the recorded ones (the record's `threshold`, when it has one, and its
    `uncertain_band`, default `decision.DEFAULT_UNCERTAIN_BAND`)."""
    path = Path(default_model_path() if path is None else path)
    if path.suffix.lower() == ".onnx":
        backend, meta = load_onnx_classifier(path, threads=threads, arena=arena)
    else:  # a PyTorch checkpoint: the one door from here into the training package (pyproject.toml)
        from facegender.training.torch_backend import load_checkpoint_backend

        backend, meta = load_checkpoint_backend(path, device, precision, threads)
    meta["path"] = str(path)
    kwargs.setdefault("temperature", meta.get("temperature", 1.0))
    kwargs.setdefault("tta", meta.get("tta", False))
    kwargs.setdefault("threshold", meta.get("threshold"))
    kwargs.setdefault("uncertain_band", meta.get("uncertain_band", DEFAULT_UNCERTAIN_BAND))
    return Model(
        meta["classes"],
        Preprocessing.from_dict(meta["preprocessing"]),
        backend,
        info=meta,
        threads=threads,
        arena=arena,
        **kwargs,
    )
