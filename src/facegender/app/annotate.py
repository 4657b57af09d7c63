"""Annotated copies of photos: a box around each face with its label and probability (`predict --annotate`).

The copy has the size of the (EXIF-upright) input photo; boxes and landmarks are those `predict`
reports, in the same pixel coordinates. Faces (`core.results.Face`) are numbered left to right
(`results.face_numbers`; `predict`'s text output and the web page use the same numbers) and every
label lies inside the image
(`place_label`). Images where no face was found get a note in the corner, so that a folder of
annotated images shows every input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from facegender.core.files import atomic_path
from facegender.core.images import ImageError, load_image
from facegender.core.results import NO_FACE, Face, PhotoResult, face_numbers

__all__ = [
    "PALETTE",
    "UNCERTAIN_COLOR",
    "face_numbers",
    "face_label",
    "place_label",
    "label_layout",
    "draw_faces",
    "annotated_name",
    "annotate_result",
    "annotate_results",
]

#: Box colours by class position (first class, second class, ...); "uncertain" is grey.
PALETTE = [(230, 60, 60), (40, 120, 230), (40, 170, 80), (200, 140, 20), (150, 70, 200)]
UNCERTAIN_COLOR = (150, 150, 150)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable default font
    except TypeError:
        return ImageFont.load_default()


def face_label(face: Face, number: int | None = None) -> str:
    """ "2: female 0.93" (or "female 0.93" without a number)."""
    text = f"{face.label} {face.probability:.2f}"
    return text if number is None else f"{number}: {text}"


def place_label(size: tuple[int, int], box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where a label of `size` (width, height) goes for a face `box`: the rectangle (left, top,
    right, bottom; right and bottom exclusive), always inside the image. Above the box when there is
    room; else below it; else inside the box at its top (a box as tall as the image). Shifted left
    when the box is at the right edge; a label wider or taller than the image is cut to it."""
    width, height = image_size
    w, h = min(int(size[0]), width), min(int(size[1]), height)
    x1, y1, x2, y2 = (round(v) for v in box)
    if y1 - h >= 0:
        top = y1 - h
    elif y2 + h <= height:
        top = y2
    else:
        top = y1
    top = min(max(0, top), height - h)
    left = min(max(0, x1), width - w)
    return left, top, left + w, top + h


def label_layout(image_size: tuple[int, int], faces: Sequence[Face]) -> list[dict]:
    """For each face (in `faces` order): its `number`, label `text`, `font` and label `rect`
    (`place_label`), as `draw_faces` draws them. Faces are numbered unless the only "face" is the
    whole image."""
    width, height = image_size
    line = max(2, round(min(image_size) / 250))
    numbered = not (len(faces) == 1 and faces[0].is_whole_image)
    numbers = face_numbers(faces)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    layout = []
    for face, number in zip(faces, numbers):
        text = face_label(face, number if numbered else None)
        size = max(12, round(min(image_size) / 30))
        while True:  # a smaller font when the label would be wider than the image
            font = _font(size)
            left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
            w, h = right - left + 2 * line, bottom - top + 2 * line
            if w <= width or size <= 6:
                break
            size -= 1
        rect = place_label((w, h), face.box, (width, height))
        layout.append(
            {
                "number": number if numbered else None,
                "text": text,
                "font": font,
                "line": line,
                "offset": (line - left, line - top),
                "rect": rect,
            }
        )
    return layout


def draw_faces(image: Image.Image, faces: Sequence[Face], classes: list[str] | None = None) -> Image.Image:
    """A copy of `image` with each face's box, landmarks and "number: label probability" drawn on
    it, the label always inside the image. `faces`: the faces of a `PhotoResult`."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    classes = list(classes or [])
    line = max(2, round(min(out.size) / 250))
    if not faces:
        size = max(12, round(min(out.size) / 30))
        font = _font(size)
        while size > 6 and draw.textlength(NO_FACE, font=font) + 6 * line > out.width:
            size -= 1
            font = _font(size)
        draw.text(
            (line * 3, line * 3), NO_FACE, fill=(255, 255, 255), font=font, stroke_width=line, stroke_fill=(0, 0, 0)
        )
    layout = label_layout(out.size, faces)
    colors = [PALETTE[classes.index(f.label) % len(PALETTE)] if f.label in classes else UNCERTAIN_COLOR for f in faces]
    for face, color in zip(faces, colors):  # boxes first, so that no box is drawn over a label
        x1, y1, x2, y2 = face.box
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        for x, y in face.landmarks or ():
            draw.ellipse([x - line, y - line, x + line, y + line], fill=color)
    for spot, color in zip(layout, colors):
        left, top, right, bottom = spot["rect"]
        draw.rectangle([left, top, right - 1, bottom - 1], fill=color)
        dx, dy = spot["offset"]
        draw.text((left + dx, top + dy), spot["text"], fill=(255, 255, 255), font=spot["font"])
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


def annotate_result(
    result: PhotoResult, out_dir: str | os.PathLike, classes: list[str] | None = None, used: set[str] | None = None
) -> Path | None:
    """Write the annotated copy of one `PhotoResult` into `out_dir` (created); its path, or
    None for an input that cannot be read. `used`: the names given so far (`annotated_name`), one
    set for a whole run, so that two photos with the same name get two copies. The result is not
    changed (`predict --annotate` writes each copy as its result arrives)."""
    if result.error:
        return None
    try:
        image = load_image(result.file)
    except ImageError:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / annotated_name(result.file, set() if used is None else used)
    drawn = draw_faces(image, result.faces, classes)
    with atomic_path(target) as tmp:
        if target.suffix == ".png":
            drawn.save(tmp, format="PNG")
        else:
            drawn.save(tmp, format="JPEG", quality=92)
    return target


def annotate_results(
    results: Iterable[PhotoResult], out_dir: str | os.PathLike, classes: list[str] | None = None
) -> list[Path]:
    """Write an annotated copy of every readable input of `Model.predict_paths` results into
    `out_dir` (created); returns the written paths. Each result gets `annotated` (its path)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for result in results:
        target = annotate_result(result, out_dir, classes, used)
        if target is not None:
            result.annotated = str(target)
            written.append(target)
    return written
