"""Training-time transforms (PyTorch): random augmentation of the prepared uint8 image, then the
one normalisation of `preprocessing.normalize`.

`TrainPreset` (random augmentation) or `EvalPreset` is applied to the uint8 image (3, S, S) that
`preprocessing.ImagePreparer` made; both return a normalised float tensor. Prediction does not
use this module (it needs no PyTorch): it calls `preprocessing.normalize` directly.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from facegender.core.preprocessing import Preprocessing, normalize


class EvalPreset:
    """uint8 image (3, S, S), numpy or tensor -> normalised float tensor: `preprocessing.normalize`
    (the one normalisation of training, evaluation and prediction). No randomness."""

    def __init__(self, prep: Preprocessing):
        self.prep = prep

    def __call__(self, img) -> torch.Tensor:
        img = img.numpy() if isinstance(img, torch.Tensor) else img
        return torch.from_numpy(normalize(img, self.prep))


class TrainPreset:
    """Random augmentation of the prepared uint8 image (3, S, S), then `EvalPreset`'s normalisation.

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
            aug = [v2.RandomHorizontalFlip(), v2.RandomRotation(10), v2.ColorJitter(brightness=0.2, contrast=0.2)]
        elif kind == "strong":
            aug = [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03)], p=0.8),
                v2.RandomGrayscale(p=0.1),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.2),
                v2.RandomApply([_LowResolution(size)], p=0.2),
            ]
        elif kind == "light":  # the jittered views of frozen-feature training (features.py)
            aug = [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=5, translate=(0.03, 0.03), scale=(0.95, 1.05)),
                v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)], p=0.8),
                v2.RandomGrayscale(p=0.1),
                v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
            ]
        elif kind == "none":
            aug = []
        else:
            raise ValueError(f"unknown augmentation {kind!r}")
        self.augment = v2.Compose(aug or [v2.Identity()])
        self.normalize = EvalPreset(prep)

    def __call__(self, img) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
        return self.normalize(self.augment(img))


class _LowResolution(torch.nn.Module):
    """Downscale to 24-64 px and back: faces in group photos are often that small."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        low = int(torch.randint(24, 65, ()).item())
        small = F.resize(img, [low, low], antialias=True)
        return F.resize(small, [self.size, self.size], antialias=True)
