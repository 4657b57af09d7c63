"""Face alignment: 5 landmarks onto a fixed template, into square crops with hair and chin.

`FaceAlignConfig` holds how faces are found and cropped (a model records it as a plain dict in
`Preprocessing.face`; `Preprocessing.face_config` is that dict parsed). `alignment_matrix` fits a
similarity transform (rotation, uniform scale, shift) from a face's five landmarks (detect.py finds
them) to a fixed template: the standard ArcFace 112x112 template, placed in a larger canvas so that
the crop keeps hair and chin (`FaceAlignConfig.margin`), or dlib's face chip (template "dlib").
`align_face` warps the image with that transform; pixels outside the photo get a constant colour
(never a mirror image, which would invent a second chin or extra hair). `fallback_crop` centres
and pads an image where no face was found, the way a tight face crop lands after alignment.

Coordinates: pixel (i, j) has its centre at (i, j), as in the detector's output and in the ArcFace
template; a box (x1, y1, x2, y2) spans the pixel edges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from facegender.core.errors import ConfigError

#: The ArcFace 5-point template for a 112x112 crop: left eye, right eye, nose tip, left and right
#: mouth corners, as seen in the image (insightface `arcface_dst`).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ARCFACE_SIZE = 112.0

#: dlib's face chip (the chips dlib's face-recognition ResNet was trained on, dlib_resnet.py): where
#: RetinaFace's 5 landmarks (left eye, right eye, nose tip, left and right mouth corner, as in
#: facegender.core.faces; pixel centres at integers) sit in dlib's chip `get_face_chip(img, shape, 150,
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
        beat 0.3 on validation and on the sample photos (docs/faces.md, "Margin and the visible region").
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
            raise ConfigError(f"template must be arcface or dlib, got {self.template!r}")
        if self.template == "dlib" and self.margin != 0:
            raise ConfigError("the dlib chip has its own fixed padding; margin must be 0 with template dlib")
        self.pad_color = tuple(int(c) for c in self.pad_color)  # type: ignore[assignment]
        if len(self.pad_color) != 3:
            raise ConfigError(f"pad_color must have 3 values (RGB), got {self.pad_color}")
        if self.size < 8:
            raise ConfigError(f"size must be at least 8 pixels, got {self.size}")
        if self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if self.max_faces < 1:
            raise ConfigError(f"max_faces must be >= 1, got {self.max_faces}")
        if self.detect_pad < 0:
            raise ConfigError(f"detect_pad must be >= 0, got {self.detect_pad}")

    @classmethod
    def from_dict(cls, d: dict | None) -> FaceAlignConfig:
        """Build from a dict (e.g. a checkpoint's); unknown keys are ignored, lists become tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in (d or {}).items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        (size, size), Image.AFFINE, tuple(inverse[:2].ravel()), resample=Image.BILINEAR, fillcolor=tuple(fill)
    )


def align_face(image: Image.Image, landmarks: np.ndarray, config: FaceAlignConfig) -> Image.Image:
    """The face with these landmarks, rotated upright and scaled onto the template: a
    size x size RGB crop; outside the photo is pad_color."""
    return warp_affine(image, alignment_matrix(landmarks, config), config.size, config.pad_color)


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
