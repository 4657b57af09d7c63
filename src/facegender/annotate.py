"""Annotated copies of photos: a box around each face with its label and probability (`predict --annotate`).

The copy has the size of the (EXIF-upright) input photo; boxes and landmarks are those `predict`
reports, in the same pixel coordinates. Images where no face was found get a note in the corner,
so that a folder of annotated images shows every input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

from facegender.checkpoint import atomic_path
from facegender.images import ImageError, load_image

#: Box colours by class position (first class, second class, ...); "uncertain" is grey.
PALETTE = [(230, 60, 60), (40, 120, 230), (40, 170, 80), (200, 140, 20), (150, 70, 200)]
UNCERTAIN_COLOR = (150, 150, 150)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable default font
    except TypeError:
        return ImageFont.load_default()


def draw_faces(image: Image.Image, faces: list[dict], classes: list[str] | None = None) -> Image.Image:
    """A copy of `image` with each face's box, landmarks and "label probability" drawn on it.
    `faces` are the face dicts of a `Predictor` result."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    classes = list(classes or [])
    line = max(2, round(min(out.size) / 250))
    font = _font(max(12, round(min(out.size) / 30)))
    if not faces:
        draw.text((line * 3, line * 3), "no face found", fill=(255, 255, 255), font=font,
                  stroke_width=line, stroke_fill=(0, 0, 0))
    for face in faces:
        label = face["label"]
        color = PALETTE[classes.index(label) % len(PALETTE)] if label in classes else UNCERTAIN_COLOR
        x1, y1, x2, y2 = face["box"]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        for x, y in face.get("landmarks") or []:
            draw.ellipse([x - line, y - line, x + line, y + line], fill=color)
        text = f"{label} {face['probability']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y2 + line  # above the box, else below
        tx = min(max(0, x1), max(0, out.width - tw - 2 * line))
        draw.rectangle([tx, ty, tx + tw + 2 * line, ty + th + 2 * line], fill=color)
        draw.text((tx + line - left, ty + line - top), text, fill=(255, 255, 255), font=font)
    return out


def annotated_name(source: str | os.PathLike, used: set[str]) -> str:
    """`photo.jpg` -> `photo.jpg` (`photo_2.jpg`... when two inputs share a name); always .jpg or .png."""
    p = Path(source)
    suffix = ".png" if p.suffix.lower() == ".png" else ".jpg"
    stem, name, i = p.stem, p.stem + suffix, 1
    while name.lower() in used:
        i += 1
        name = f"{stem}_{i}{suffix}"
    used.add(name.lower())
    return name


def annotate_results(results: Iterable[dict], out_dir: str | os.PathLike, classes: list[str] | None = None
                     ) -> list[Path]:
    """Write an annotated copy of every readable input of `Predictor.predict_paths` results into
    `out_dir` (created); returns the written paths. Each result gets `annotated` (its path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for result in results:
        if result.get("error"):
            continue
        try:
            image = load_image(result["file"])
        except ImageError:
            continue
        target = out_dir / annotated_name(result["file"], used)
        drawn = draw_faces(image, result["faces"], classes)
        with atomic_path(target) as tmp:
            if target.suffix == ".png":
                drawn.save(tmp, format="PNG")
            else:
                drawn.save(tmp, format="JPEG", quality=92)
        result["annotated"] = str(target)
        written.append(target)
    return written
