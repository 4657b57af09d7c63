"""Preprocessing: one recipe, recorded in every model file, used by train, evaluate, predict and serve.

An image goes through two steps, both in numpy and Pillow (no PyTorch, so an exported model
predicts without it):
1. `ImagePreparer(prep)(pil) -> uint8 array (3, S, S)`: the deterministic part (face alignment
   when the model was trained on aligned faces, then resize to S x S). Training caches its output,
   so each image is decoded and resized once, not once per epoch.
2. `normalize(uint8 images) -> float32`: outside the visible box set to the padding colour, then
   `x / 255`, then the backbone's own mean/std. Training's augmentation (`transforms.TrainPreset`,
   PyTorch) runs on the uint8 image first and ends with this same function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from facegender.core.faces.align import FaceAlignConfig


@dataclass
class Preprocessing:
    """The recipe. Its fields are plain data (what `to_dict` writes into checkpoints and ONNX
    metadata); `face_config` is `face` parsed, once. Treat an instance as read-only and make a
    changed copy with `dataclasses.replace`, which parses anew."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    face: dict | None = None  # FaceAlignConfig as a plain dict: faces are detected and aligned first
    # Aligned faces only: the part of the crop (x0, y0, x1, y1, fractions of its side) that the
    # training images filled; everything outside is set to the padding colour, in training and at
    # prediction alike (see `visible_region`). None: the whole crop.
    visible: tuple[float, float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["visible"] = None if self.visible is None else list(self.visible)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        visible = d.get("visible")
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            face=d.get("face"),
            visible=None if visible is None else tuple(float(v) for v in visible),
        )

    @functools.cached_property
    def face_config(self) -> FaceAlignConfig | None:
        """`face` as a FaceAlignConfig (parsed on first use, then kept; shared, so not to be changed:
        copy it first), or None without face alignment."""
        if self.face is None:
            return None
        from facegender.core.faces.align import FaceAlignConfig

        return FaceAlignConfig.from_dict(self.face)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return self.face_config.pad_color if self.face_config is not None else (128, 128, 128)

    def resize(self, image: Image.Image) -> np.ndarray:
        """PIL RGB image -> uint8 array (3, S, S): the report's plain resize to S x S (Pillow's
        bilinear filter, antialiased when shrinking). An image already S x S is not resampled."""
        size = (self.image_size, self.image_size)
        image = image if image.mode == "RGB" else image.convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def keep_visible(images: np.ndarray, visible: Sequence[float], fill: Sequence[int]) -> np.ndarray:
    """A copy of uint8 images (..., 3, H, W) with the pixels outside the `visible` box set to `fill`."""
    h, w = images.shape[-2:]
    x0, y0, x1, y1 = visible
    c0, r0, c1, r1 = round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)
    out = np.empty_like(images)
    out[...] = np.asarray(fill, dtype=images.dtype).reshape(3, 1, 1)
    out[..., r0:r1, c0:c1] = images[..., r0:r1, c0:c1]
    return out


def normalize(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 images (..., 3, S, S) -> normalised float32: (outside the visible box set to the padding
    colour,) `x / 255`, then `(x - mean) / std` per channel. No randomness."""
    images = np.asarray(images)
    if prep.visible is not None:
        images = keep_visible(images, prep.visible, prep.pad_color)
    x = images.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def visible_region(
    images: Sequence[np.ndarray], pad_color: tuple[int, int, int], share: float = 0.5, tolerance: int = 24
) -> tuple[float, float, float, float] | None:
    """The box (x0, y0, x1, y1, fractions) of the pixels that hold image content, not padding, in at
    least `share` of the aligned training crops `images` (uint8 (3, S, S)); None when that is
    (nearly) the whole crop.

    Why: a data set of tight face crops, aligned with a margin for hair and chin, gives crops that
    are partly padding (faces-gdf at margin 0.3: 69% of each crop on average), while a face in a
    photo comes with real hair, shoulders and background there. A model that never saw content in
    that part of the crop is then shown something new at prediction time. Keeping only this box, in
    training and prediction alike, shows the model the same kind of picture in both. A pixel counts
    as padding when its absolute differences from `pad_color`, summed over the 3 channels, are at
    most `tolerance` (JPEG noise).
    """
    if not len(images):
        return None
    pad = np.asarray(pad_color, dtype=np.int16).reshape(3, 1, 1)
    coverage = np.zeros(np.asarray(images[0]).shape[-2:], dtype=np.float64)
    for img in images:
        coverage += np.abs(np.asarray(img).astype(np.int16) - pad).sum(0) > tolerance
    coverage /= len(images)
    ys, xs = np.nonzero(coverage >= share)
    if len(xs) == 0:
        return None
    h, w = coverage.shape
    box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    if (box[2] - box[0]) * (box[3] - box[1]) >= 0.98:
        return None
    return tuple(round(float(v), 4) for v in box)  # type: ignore[return-value]


class ImagePreparer:
    """The deterministic step for one face per image: (align the largest face,) resize to uint8.

    Used for training and evaluation images, which are one face each. Without a face config it is
    the report's plain resize. With one, the largest detected face is aligned; an image where no
    face is found is centred and padded the same way instead of being dropped (`prepare` says
    which happened). The detector is created on first use, once per preparer.
    """

    def __init__(self, prep: Preprocessing):
        self.prep = prep
        self._detector = None

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.prepare(image)[0]

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, bool]:
        """uint8 array (3, S, S) and whether a face was found (always True without alignment)."""
        config = self.prep.face_config
        if config is None:
            return self.prep.resize(image), True
        from facegender.core.faces.detect import FaceDetector, align_or_fallback

        if self._detector is None:
            self._detector = FaceDetector(config)
        aligned, face = align_or_fallback(self._detector, image, config)
        return self.prep.resize(aligned), face is not None
