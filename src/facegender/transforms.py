"""Preprocessing: one recipe, recorded in every model file, used by train, evaluate, predict and serve.

An image goes through two steps:
1. `Preprocessing.prepare(pil) -> uint8 tensor (3, S, S)`: the deterministic part (face alignment
   when the model was trained on aligned faces, then resize to S x S). Training caches its output,
   so each image is decoded and resized once, not once per epoch.
2. `TrainPreset` (random augmentation) or `EvalPreset`, applied to that uint8 tensor: convert to
   float and normalise with the backbone's own mean/std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


@dataclass
class Preprocessing:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    face: dict | None = None  # FaceAlignConfig as a dict: faces are detected and aligned first
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
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        visible = d.get("visible")
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   face=d.get("face"), visible=None if visible is None else tuple(float(v) for v in visible))

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple((self.face or {}).get("pad_color", (128, 128, 128)))  # type: ignore[return-value]

    def resize(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 tensor (3, S, S): the report's plain resize to S x S."""
        t = F.pil_to_tensor(image)
        return F.resize(t, [self.image_size, self.image_size], antialias=True)


def visible_region(images: list[torch.Tensor], pad_color: tuple[int, int, int], share: float = 0.5,
                   tolerance: int = 24) -> tuple[float, float, float, float] | None:
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
    if not images:
        return None
    pad = torch.tensor(pad_color, dtype=torch.int16).view(3, 1, 1)
    coverage = torch.zeros(images[0].shape[-2:], dtype=torch.float64)
    for img in images:
        coverage += ((img.to(torch.int16) - pad).abs().sum(0) > tolerance).double()
    coverage /= len(images)
    ys, xs = torch.nonzero(coverage >= share, as_tuple=True)
    if len(xs) == 0:
        return None
    h, w = coverage.shape
    box = (xs.min().item() / w, ys.min().item() / h, (xs.max().item() + 1) / w, (ys.max().item() + 1) / h)
    if (box[2] - box[0]) * (box[3] - box[1]) >= 0.98:
        return None
    return tuple(round(v, 4) for v in box)  # type: ignore[return-value]


class _KeepVisible(torch.nn.Module):
    """Set the pixels of a uint8 (..., 3, H, W) image outside the `visible` box to `fill`."""

    def __init__(self, visible: tuple[float, float, float, float], fill: tuple[int, int, int]):
        super().__init__()
        self.visible = visible
        self.fill = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        x0, y0, x1, y1 = self.visible
        c0, r0, c1, r1 = round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)
        out = torch.empty_like(img)
        out[...] = self.fill
        out[..., r0:r1, c0:c1] = img[..., r0:r1, c0:c1]
        return out


class EvalPreset:
    """uint8 (3, S, S) -> (outside the visible box set to the padding colour) -> normalised float
    tensor. No randomness."""

    def __init__(self, prep: Preprocessing):
        keep = [_KeepVisible(prep.visible, prep.pad_color)] if prep.visible is not None else []
        self.transform = v2.Compose([
            *keep,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.transform(img)


class TrainPreset:
    """Random augmentation on the cached uint8 tensor, then the same conversion as `EvalPreset`.

    `report`: the course report's flip, rotation 10 degrees, brightness/contrast jitter.
    `strong`: adds what varies between photo collections: scale/position (random resized crop),
    colour and saturation, greyscale, blur and low resolution.
    `light`: flip, small affine, colour, greyscale, blur: the jittered views embedded once for
    frozen-feature training.
    `none`: no augmentation (for tests and ablations).
    """

    def __init__(self, prep: Preprocessing, kind: str = "report"):
        size = prep.image_size
        if kind == "report":
            aug = [
                v2.RandomHorizontalFlip(),
                v2.RandomRotation(10),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        elif kind == "strong":
            aug = [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)],
                               p=0.8),
                v2.RandomGrayscale(p=0.1),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.2),
                v2.RandomApply([_LowResolution(size)], p=0.2),
            ]
        elif kind == "light":  # the jittered views of frozen-feature training (features.py)
            aug = [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=5, translate=(0.03, 0.03), scale=(0.95, 1.05)),
                v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)],
                               p=0.8),
                v2.RandomGrayscale(p=0.1),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
            ]
        elif kind == "none":
            aug = []
        else:
            raise ValueError(f"unknown augmentation {kind!r}")
        self.transform = v2.Compose([*aug, EvalPreset(prep).transform])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.transform(img)


class _LowResolution(torch.nn.Module):
    """Downscale to 24-64 px and back: faces in group photos are often that small."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        low = int(torch.randint(24, 65, ()).item())
        small = F.resize(img, [low, low], antialias=True)
        return F.resize(small, [self.size, self.size], antialias=True)


class ImagePreparer:
    """The deterministic step for one face per image: (align the largest face,) resize to uint8.

    Used for training and evaluation images, which are one face each. Without a face config it is
    the report's plain resize. With one, the largest detected face is aligned; an image where no
    face is found is centred and padded the same way instead of being dropped (`last_found` says
    which happened). The detector is created on first use, once per preparer.
    """

    def __init__(self, prep: Preprocessing):
        self.prep = prep
        self._detector = None
        self._face_config = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.prepare(image)[0]

    def prepare(self, image: Image.Image) -> tuple[torch.Tensor, bool]:
        """uint8 tensor and whether a face was found (always True without alignment)."""
        if self.prep.face is None:
            return self.prep.resize(image), True
        from facegender.faces import FaceAlignConfig, FaceDetector, align_or_fallback

        if self._detector is None:
            self._face_config = FaceAlignConfig.from_dict(self.prep.face)
            self._detector = FaceDetector(self._face_config)
        aligned, face = align_or_fallback(self._detector, image, self._face_config)
        return self.prep.resize(aligned), face is not None
