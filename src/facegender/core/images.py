"""Reading images from disk or bytes: every mode Pillow knows becomes 8-bit RGB, upright.

One function, `load_image`, is used by training, evaluation, prediction, face preparation and the
server alike, so an image is read the same way everywhere.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from facegender.core.errors import DataError

#: Images with more pixels than this are refused before they are decoded (50 MP photos are fine).
DEFAULT_MAX_PIXELS = 100_000_000

#: File name endings treated as images when a folder is scanned.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(DataError, ValueError):
    """An image could not be used; the message names the file and says why."""


def is_image_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders walked recursively for image files (sorted). Missing paths are kept,
    so that they are reported as errors in their place. `iter_paths` as a list."""
    return list(iter_paths(paths))


def iter_paths(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """`expand_paths` lazily: files as given, each folder's image files as `walk_images` finds them
    (the same paths in the same order), so the first one comes before a big folder is listed."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from walk_images(p)
        else:
            yield p


def walk_images(folder: str | os.PathLike) -> Iterator[Path]:
    """The image files under `folder`, depth first, each directory's entries sorted by name (files
    and subfolders together): the order of `sorted(folder.rglob("*"))`. Holds one directory's
    listing at a time per level, never the whole tree; like rglob, it does not follow symlinked
    folders (symlinked files count) and skips folders it cannot read."""
    folder = Path(folder)
    names, subfolders = [], set()  # names only (no tuples): a folder of 100,000 photos held in ~8 MB
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    subfolders.add(e.name)
                    names.append(e.name)
                elif is_image_name(e.name) and e.is_file():
                    names.append(e.name)
    except OSError:
        return
    names.sort()
    for name in names:
        if name in subfolders:
            yield from walk_images(folder / name)
        else:
            yield folder / name


def count_images(paths: Iterable[str | os.PathLike]) -> int:
    """How many paths `iter_paths(paths)` yields, counted without sorting (for a progress total)."""

    def count(folder: str) -> int:
        n = 0
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        n += count(e.path)
                    elif is_image_name(e.name) and e.is_file():
                        n += 1
        except OSError:
            pass
        return n

    return sum(count(str(p)) if Path(p).is_dir() else 1 for p in paths)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: scale to the full 8-bit range instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    source: str | os.PathLike | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open an image as upright 8-bit RGB.

    `source` is a path, raw bytes or a binary file object. EXIF orientation is applied, the first
    frame of an animation is taken, alpha is composited on white, 16-bit greyscale is rescaled.
    Raises `ImageError` naming the file for anything unreadable, and for images with more than
    `max_pixels` pixels (checked from the header, before decoding).
    """
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise ImageError(f"{name}: file not found")
        if p.is_dir():
            raise ImageError(f"{name}: is a folder, not an image")
        if p.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes); replace or delete it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: {width}x{height} pixels is more than the limit of {max_pixels:,}; "
                    "downscale the image first"
                )
            if width < 1 or height < 1:
                raise ImageError(f"{name}: image has no pixels")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy: a 12 MP photo is 36 MB
            return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc)
        if "cannot identify image file" in reason:
            reason = "unknown or damaged image format"
        raise ImageError(
            f"{name}: not a readable image ({exc.__class__.__name__}: {reason}); replace or delete the file"
        ) from None
