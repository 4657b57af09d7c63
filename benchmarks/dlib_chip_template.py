"""Where RetinaFace's 5 landmarks sit in dlib's face-recognition chip, and how well a chip made
from them reproduces dlib's descriptors.

    python benchmarks/dlib_chip_template.py [--shared ../shared] [--limit N]

dlib's network was trained on `get_face_chip(img, shape, 150, 0.25)` of its own 5-point
landmarks (eye corners, nose bottom). facegender finds faces with RetinaFace (eye centres, nose
tip, mouth corners), so a chip is `warp_affine(img, similarity_transform(landmarks, T), 150)`
for a template T in chip pixels (pixel centres at integers, as in facegender.core.faces).

1. Reference chips: dlib's 5-point shape predictor in the whole image (faces-dev crops are tight,
   the whole image is the face box), `get_face_chip_details(shape, 150, 0.25)`; its image -> chip
   mapping is dlib's `get_mapping_to_chip` (the rotated rectangle's corners onto the chip's).
2. Template "mapped": RetinaFace (facegender's FaceDetector, refined landmarks) on each
   faces-dev/train image, landmarks mapped into dlib's chip, averaged (the least-squares template
   for fixed chip coordinates).
   Template "on chips": RetinaFace run on dlib's chips themselves, averaged.
3. On faces-dev/test: cosine similarity between the descriptor of dlib's chip and that of the
   chip from RetinaFace's landmarks and each template (descriptors by DlibResNet, which matches
   dlib to 4e-7). Chips are filled with black outside the photo, as dlib's extract_image_chip does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facegender.core import dlib_onnx
from facegender.core.faces.align import FaceAlignConfig, similarity_transform, warp_affine
from facegender.core.faces.detect import FaceDetector
from facegender.core.images import load_image
from facegender.training import dlib_resnet as D


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def mapping_to_chip(details) -> np.ndarray:
    """dlib's get_mapping_to_chip as a 2x3 matrix (image pixels -> chip pixels): the chip
    rectangle's top-left, top-right and bottom-right corners, rotated by `angle` about its centre,
    go to (0, 0), (cols-1, 0), (cols-1, rows-1)."""
    r = details.rect
    centre = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
    c, s = np.cos(details.angle), np.sin(details.angle)
    rot = np.array([[c, -s], [s, c]])
    corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.right(), r.bottom()]])
    src = (corners - centre) @ rot.T + centre
    dst = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], dtype=np.float64)
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T  # 2x3


def dlib_chip(dlib, predictor, rgb: np.ndarray):
    shape = predictor(rgb, dlib.rectangle(0, 0, rgb.shape[1] - 1, rgb.shape[0] - 1))
    details = dlib.get_face_chip_details(shape, dlib_onnx.CHIP_SIZE, dlib_onnx.CHIP_PADDING)
    return dlib.extract_image_chip(rgb, details), mapping_to_chip(details)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def describe(net, chips: list[np.ndarray]) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(chips), 32):
            out.append(net(D.to_input(np.stack(chips[i : i + 32]))).double().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--limit", type=int, default=0, help="images per split (0: all)")
    args = parser.parse_args()
    import dlib

    torch.set_num_threads(2)
    t0 = time.time()
    dat = dlib_onnx.weights_file()
    predictor = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    detector = FaceDetector(FaceAlignConfig(), threads=2)
    net = D.load_dlib_resnet()
    black = (0, 0, 0)

    def split(name):
        paths = list_images(args.shared / "datasets" / "faces-dev" / name)
        return paths[: args.limit] if args.limit else paths

    # ---- templates from faces-dev/train
    mapped, on_chips, pixel_diff, missed = [], [], [], 0
    for path in split("train"):
        image = load_image(path)
        rgb = np.asarray(image)
        chip, m = dlib_chip(dlib, predictor, rgb)
        # check the mapping: warping with it reproduces dlib's chip (up to interpolation)
        pixel_diff.append(
            np.abs(np.asarray(warp_affine(image, m, dlib_onnx.CHIP_SIZE, black), np.float64) - chip.astype(np.float64))[
                8:-8, 8:-8
            ].mean()
        )
        faces = detector.detect(image)
        if not faces:
            missed += 1
            continue
        lm = faces[0].landmarks.astype(np.float64)
        mapped.append(lm @ m[:, :2].T + m[:, 2])
        found = detector.detect(Image.fromarray(chip))
        if found:
            on_chips.append(found[0].landmarks.astype(np.float64))
    mapped, on_chips = np.array(mapped), np.array(on_chips)
    print(
        f"train: {len(mapped)} faces ({missed} without a RetinaFace face); warp with dlib's mapping vs "
        f"dlib's chip: mean abs pixel difference {np.mean(pixel_diff):.2f} (median {np.median(pixel_diff):.2f})"
    )
    templates = {
        "mapped": mapped.mean(axis=0),
        "on chips": on_chips.mean(axis=0),
        "mapped, median": np.median(mapped, axis=0),
    }
    names = ["left eye", "right eye", "nose tip", "left mouth", "right mouth"]
    for label, t in templates.items():
        print(f"\ntemplate {label} (150 px chip):")
        print("np.array([" + ", ".join(f"[{x:.2f}, {y:.2f}]" for x, y in t) + "])")
    spread = mapped.std(axis=0)
    print(
        "\nspread of the mapped landmarks (std, px): "
        + ", ".join(f"{n} ({sx:.1f}, {sy:.1f})" for n, (sx, sy) in zip(names, spread))
    )

    # ---- descriptors on faces-dev/test
    ref_chips, ours = [], {k: [] for k in templates}
    skipped = 0
    for path in split("test"):
        image = load_image(path)
        chip, _ = dlib_chip(dlib, predictor, np.asarray(image))
        faces = detector.detect(image)
        if not faces:
            skipped += 1
            continue
        ref_chips.append(chip)
        for label, t in templates.items():
            matrix = similarity_transform(faces[0].landmarks, t)
            ours[label].append(np.asarray(warp_affine(image, matrix, dlib_onnx.CHIP_SIZE, black)))
    ref = describe(net, ref_chips)
    print(
        f"\ntest: {len(ref_chips)} faces ({skipped} without a RetinaFace face); cosine similarity of "
        "descriptors, dlib's chip vs RetinaFace chip:"
    )
    print(f"{'template':<16} {'mean':>7} {'p5':>7} {'min':>7} {'euclid mean':>12}")
    for label in templates:
        got = describe(net, ours[label])
        cos = cosine(ref, got)
        dist = np.linalg.norm(ref - got, axis=1)
        print(f"{label:<16} {cos.mean():7.4f} {np.percentile(cos, 5):7.4f} {cos.min():7.4f} {dist.mean():12.3f}")
    # scale: different faces
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(ref), 500), rng.integers(0, len(ref), 500)
    keep = i != j
    print(
        f"(different test faces, dlib chips: cosine mean {cosine(ref[i[keep]], ref[j[keep]]).mean():.4f}, "
        f"euclidean mean {np.linalg.norm(ref[i[keep]] - ref[j[keep]], axis=1).mean():.3f})"
    )
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
