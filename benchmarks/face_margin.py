"""Measure face detection on the tight faces-dev crops and the effect of the alignment margin.

    python benchmarks/face_margin.py [--shared ../shared] [--sheet /tmp/margins.png]

Prints: detection rate per split with and without the detection border (detect_pad); for each
margin, how much of the aligned crop of a tight training face is padding; how alike the aligned
crops of a tight crop and of the same crop pasted into a 3x grey canvas are, with and without
landmark refinement; detection time on a 512x512 image with 1 and 2 threads. Saves a contact sheet
of aligned crops per margin.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from facegender.core.faces.align import FaceAlignConfig, align_face, alignment_matrix
from facegender.core.faces.detect import FaceDetector, align_or_fallback
from facegender.core.images import load_image


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def detection_rates(shared: Path, pads: list[float]) -> dict:
    """{split: {pad: (found, total)}}; also returns per-image landmarks at the largest pad."""
    out, landmarks = {}, {}
    for split in ("train", "test"):
        paths = list_images(shared / "datasets/faces-dev" / split)
        images = [load_image(p) for p in paths]
        out[split] = {}
        for pad in pads:
            det = FaceDetector(FaceAlignConfig(detect_pad=pad), threads=1)
            found = 0
            for p, im in zip(paths, images):
                faces = det.detect(im)
                found += bool(faces)
                if faces and pad == pads[-1]:
                    landmarks[p] = faces[0].landmarks
            out[split][pad] = (found, len(paths))
            print(f"{split:5s} detect_pad={pad:<4} found {found}/{len(paths)} = {found / len(paths):.1%}", flush=True)
    return out, landmarks


def pad_fraction(image: Image.Image, landmarks: np.ndarray, cfg: FaceAlignConfig) -> float:
    """Fraction of the aligned crop that comes from outside the image."""
    mask = Image.new("L", image.size, 255)
    m = alignment_matrix(landmarks, cfg)
    from facegender.core.faces.align import warp_affine  # same warp as align_face

    warped = warp_affine(mask.convert("RGB"), m, cfg.size, (0, 0, 0))
    return 1.0 - np.asarray(warped)[..., 0].mean() / 255.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    ap.add_argument("--sheet", type=Path, default=Path("/tmp/face_margins.png"))
    ap.add_argument("--pads", default="0,0.1,0.25")
    ap.add_argument("--margins", default="0,0.2,0.25,0.3,0.35")
    args = ap.parse_args()
    pads = [float(x) for x in args.pads.split(",")]
    margins = [float(x) for x in args.margins.split(",")]

    _, landmarks = detection_rates(args.shared, pads)

    # Padding share of aligned tight training crops, per margin.
    items = list(landmarks.items())
    for margin in margins:
        cfg = FaceAlignConfig(margin=margin)
        fr = [pad_fraction(load_image(p), lm, cfg) for p, lm in items[::5]]
        print(f"margin={margin:<5} padding in aligned tight crops: mean {np.mean(fr):.1%}, median {np.median(fr):.1%}")

    # Contact sheet: rows = photos (astronaut, group faces, some training crops), cols = margins.
    det = FaceDetector(FaceAlignConfig(), threads=1)
    sources = []
    for name in ("images/astronaut_female.png", "images/group_6_faces.jpg"):
        im = load_image(args.shared / name)
        sources += [(im, f.landmarks) for f in det.detect(im)[:3]]
    sources += [(load_image(p), lm) for p, lm in items[:: max(1, len(items) // 5)][:5]]
    cell = 160
    sheet = Image.new("RGB", (cell * len(margins), cell * len(sources)), (255, 255, 255))
    for r, (im, lm) in enumerate(sources):
        for c, margin in enumerate(margins):
            crop = align_face(im, lm, FaceAlignConfig(margin=margin, size=cell))
            sheet.paste(crop, (c * cell, r * cell))
    sheet.save(args.sheet)
    print("contact sheet (columns: margins", margins, "):", args.sheet)

    # Tight crop vs the same crop in a larger grey canvas, with and without refinement.
    paths = list_images(args.shared / "datasets/faces-dev/test")[::5]
    for steps in (0, 2):
        det = FaceDetector(FaceAlignConfig(refine_steps=steps), threads=1)
        same, crops = [], []
        for p in paths:
            tight = load_image(p)
            canvas = Image.new("RGB", (tight.width * 3, tight.height * 3), det.config.pad_color)
            canvas.paste(tight, (tight.width, tight.height))
            a, fa = align_or_fallback(det, tight)
            b, fb = align_or_fallback(det, canvas)
            if fa is None or fb is None:
                continue
            a, b = np.asarray(a, float), np.asarray(b, float)
            same.append(np.abs(a - b).mean())
            crops.append(a)
        other = [np.abs(crops[i] - crops[i + 1]).mean() for i in range(len(crops) - 1)]
        print(
            f"refine_steps={steps}: tight vs in-canvas mean abs diff over {len(same)} faces: "
            f"median {np.median(same):.2f}, max {np.max(same):.2f}; different faces: min {np.min(other):.1f}, "
            f"median {np.median(other):.1f}"
        )

    # Timing on a 512x512 photo.
    im = load_image(args.shared / "images/astronaut_female.png").resize((512, 512))
    for threads in (1, 2):
        for pad, steps in ((0.0, 0), (0.1, 0), (0.1, 2), (0.25, 2)):
            det = FaceDetector(FaceAlignConfig(detect_pad=pad, refine_steps=steps), threads=threads)
            det.detect(im)
            t = time.perf_counter()
            n = 10
            for _ in range(n):
                det.detect(im)
            print(
                f"512x512 detect, threads={threads}, detect_pad={pad}, refine_steps={steps}: "
                f"{(time.perf_counter() - t) / n * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()
