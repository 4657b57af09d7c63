"""`facegender predict`: labels for new images, one result per face.

A model trained on aligned faces (`train --align` / `--preset best`) finds every face in a photo,
aligns it as in training and classifies all faces of all images in batches. A model trained on
plain crops classifies the whole image as one face, as the course report did. `detect=False`
(`--no-detect`) treats each image as one already-cropped face either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from facegender.images import DEFAULT_MAX_PIXELS, ImageError, is_image_name, load_image
from facegender.transforms import EvalPreset, Preprocessing

UNCERTAIN = "uncertain"
NO_FACE = "no face found"


@dataclass
class _Crop:
    image_index: int
    tensor: torch.Tensor  # uint8 (3, S, S)
    box: list[float]
    landmarks: list[list[float]] | None
    detection_score: float | None


class Predictor:
    """Loads a model once; classifies faces in PIL images or files. Safe to reuse across calls;
    holds no per-request state."""

    def __init__(self, classes: Sequence[str], prep: Preprocessing, logits_fn: Callable[[torch.Tensor], np.ndarray],
                 temperature: float = 1.0, tta: bool = False, detect: bool | None = None,
                 min_confidence: float | None = None, batch_size: int = 32, info: dict | None = None,
                 threads: int | None = None, refine_steps: int | None = None):
        """`threads`: ONNX Runtime threads of the face detector (None: the runtime's default).
        `refine_steps`: landmark refinement rounds, instead of the trained face stage's (fewer is
        faster; see benchmarks/predict_speed.py)."""
        self.classes = list(classes)
        self.prep = prep
        self.logits_fn = logits_fn
        self.temperature = float(temperature)
        self.tta = tta
        self.min_confidence = min_confidence
        self.batch_size = batch_size
        self.info = info or {}
        self.normalize = EvalPreset(prep)
        self.face_config = None
        self.detector = None
        if prep.face is not None:
            from facegender.faces import FaceAlignConfig, FaceDetector

            self.face_config = FaceAlignConfig.from_dict(prep.face)
            if refine_steps is not None:
                self.face_config.refine_steps = int(refine_steps)
            if detect is not False:
                self.detector = FaceDetector(self.face_config, threads=threads)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                  **kwargs: Any) -> "Predictor":
        """A Predictor for best_model.pth (PyTorch) or an exported .onnx file (onnxruntime).
        `threads` sets the ONNX Runtime threads (classifier and face detector); PyTorch's are global
        (`torch.set_num_threads`)."""
        if str(path).lower().endswith(".onnx"):
            from facegender.export import load_onnx_classifier

            logits_fn, meta = load_onnx_classifier(path, threads=threads)
        else:
            from facegender import checkpoint as ckpt
            from facegender.engine import select_device

            model, meta = ckpt.load_model(path, select_device(device))
            logits_fn = torch_logits_fn(model, next(model.parameters()).device)
            meta = {k: v for k, v in meta.items() if k != "model_state"}
        kwargs.setdefault("temperature", meta.get("temperature", 1.0))
        kwargs.setdefault("tta", meta.get("tta", False))
        return cls(meta["classes"], Preprocessing.from_dict(meta["preprocessing"]), logits_fn, info=meta,
                   threads=threads, **kwargs)

    # ------------------------------------------------------------------ crops

    def _crops(self, index: int, image: Image.Image) -> list[_Crop]:
        full_box = [0.0, 0.0, float(image.width), float(image.height)]
        if self.face_config is None:
            return [_Crop(index, self.prep.resize(image), full_box, None, None)]
        from facegender.faces import align_face, fallback_crop

        if self.detector is None:  # --no-detect on an aligned model: centre the crop as in training
            return [_Crop(index, self.prep.resize(fallback_crop(image, self.face_config)), full_box, None, None)]
        return [_Crop(index, self.prep.resize(align_face(image, f.landmarks, self.face_config)),
                      [float(v) for v in f.box], f.landmarks.tolist(), float(f.score))
                for f in self.detector.detect(image)]

    # ------------------------------------------------------------------ classification

    def classify(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Calibrated class probabilities (N, C) for prepared uint8 crops, in batches."""
        out = []
        for start in range(0, len(tensors), self.batch_size):
            batch = torch.stack([self.normalize(t) for t in tensors[start:start + self.batch_size]])
            if self.tta:  # the image and its mirror in one network run, then the mean of the two
                both = self.logits_fn(torch.cat([batch, torch.flip(batch, dims=[3])]))
                out.append((both[:len(batch)] + both[len(batch):]) / 2)
            else:
                out.append(self.logits_fn(batch))
        if not out:
            return np.zeros((0, len(self.classes)))
        logits = np.concatenate(out).astype(np.float64) / self.temperature
        logits -= logits.max(1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(1, keepdims=True)

    def _face_result(self, crop: _Crop, probs: np.ndarray) -> dict:
        best = int(probs.argmax())
        label = self.classes[best]
        confident = self.min_confidence is None or probs[best] >= self.min_confidence
        return {
            "box": [round(v, 1) for v in crop.box],
            "landmarks": [[round(x, 1), round(y, 1)] for x, y in crop.landmarks] if crop.landmarks else None,
            "detection_score": None if crop.detection_score is None else round(crop.detection_score, 4),
            "label": label if confident else UNCERTAIN,
            "predicted_class": label,
            "probability": round(float(probs[best]), 6),
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
        }

    def predict_images(self, images: Sequence[Image.Image]) -> list[list[dict]]:
        """Faces (largest first) for each image; an empty list means no face was found."""
        crops = [c for i, im in enumerate(images) for c in self._crops(i, im)]
        probs = self.classify([c.tensor for c in crops])
        results: list[list[dict]] = [[] for _ in images]
        for crop, p in zip(crops, probs):
            results[crop.image_index].append(self._face_result(crop, p))
        return results

    def predict_sources(self, sources: Sequence[tuple[str, Any]], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict]:
        """Results for (name, path-or-bytes) pairs. A file that cannot be read gets an `error`
        and the others go on; an image without a face gets `faces: []` and `status: no face found`."""
        images, positions, results = [], [], []
        for name, src in sources:
            try:
                im = load_image(src, max_pixels=max_pixels, name=name)
                results.append({"file": name, "width": im.width, "height": im.height})
                images.append(im)
                positions.append(len(results) - 1)
            except ImageError as exc:
                results.append({"file": name, "error": str(exc), "status": "error", "faces": []})
        for i, faces in zip(positions, self.predict_images(images)):
            results[i].update(faces=faces, status="ok" if faces else NO_FACE)
        return results

    def predict_paths(self, paths: Iterable[str | os.PathLike]) -> list[dict]:
        files = expand_paths(paths)
        return self.predict_sources([(str(p), p) for p in files])


def torch_logits_fn(model: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
    model.eval()

    @torch.inference_mode()
    def logits(batch: torch.Tensor) -> np.ndarray:
        return model(batch.to(device)).float().cpu().numpy()

    return logits


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders walked recursively for image files (sorted). Missing paths are kept,
    so that they are reported as errors in their place."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_image_name(f))
        else:
            files.append(p)
    return files


def format_result(result: dict) -> str:
    """One line per face for people."""
    if result.get("error"):
        return f"{result['file']}: ERROR {result['error']}"
    if not result["faces"]:
        return f"{result['file']}: {NO_FACE}"
    lines = []
    for i, f in enumerate(result["faces"]):
        where = "" if len(result["faces"]) == 1 and f["landmarks"] is None else \
            f" face {i + 1} at ({', '.join(f'{v:.0f}' for v in f['box'])})"
        note = f" (most likely {f['predicted_class']})" if f["label"] == UNCERTAIN else ""
        lines.append(f"{result['file']}:{where} {f['label']}{note} {f['probability']:.3f}")
    return "\n".join(lines)
