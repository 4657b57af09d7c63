"""Accuracy of a model on degraded copies of a labelled test folder: how well a recipe carries over
to photos unlike its training set (blur, low resolution, greyscale, heavy JPEG).

Each test image is degraded first and then goes through the model's own preprocessing (face
detection and alignment when the model was trained aligned, falling back to the centred crop when
no face is found, exactly as in training), then the model with its recorded TTA and temperature.

    python benchmarks/robustness_eval.py --model output/best_model.pth|model.onnx \
        --data ../shared/datasets/faces-gdf/test [--json out.json]

Prints one row per degradation: accuracy, 95% Wilson interval, and the share of images where no
face was found (aligned models only).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def blur(im: Image.Image) -> Image.Image:
    """Gaussian blur, radius 2% of the shorter side (out of focus / motion)."""
    return im.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.02 * min(im.size))))


def downscale32(im: Image.Image) -> Image.Image:
    """Longer side shrunk to 32 px (a face far away in a group photo), then back to the original size."""
    scale = 32 / max(im.size)
    small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return small.resize(im.size, Image.BILINEAR)


def grayscale(im: Image.Image) -> Image.Image:
    return im.convert("L").convert("RGB")


def jpeg20(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=20)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


DEGRADATIONS = {
    "none": lambda im: im,
    "blur": blur,
    "downscale_32px": downscale32,
    "grayscale": grayscale,
    "jpeg_q20": jpeg20,
}


def labelled_images(folder: Path, classes: list[str], limit: int | None = None) -> list[tuple[Path, int]]:
    """(path, label) of folder/<class>/*, at most `limit` per class (for a quick check)."""
    from facegender.core.images import is_image_name

    items = []
    for label, name in enumerate(classes):
        files = [p for p in sorted((folder / name).rglob("*")) if p.is_file() and is_image_name(p)]
        items += [(p, label) for p in files[:limit]]
    if not items:
        raise SystemExit(f"{folder}: no images in class folders {classes}")
    return items


def evaluate_degradations(
    model_path: str,
    data: str,
    names: list[str],
    batch_size: int = 64,
    limit: int | None = None,
    refine_steps: int | None = None,
) -> dict:
    """Accuracy per degradation. `refine_steps` replaces the model's recorded landmark refinement
    (an experiment: what a predict-time change would cost; the recorded value is what predict uses)."""
    import dataclasses

    import facegender
    from facegender.core.images import load_image
    from facegender.core.preprocessing import ImagePreparer
    from facegender.evaluation.metrics import wilson_interval

    model = facegender.load(model_path, device="cpu")  # best_model.pth or an exported .onnx
    classes, prep = model.classes, model.prep
    if refine_steps is not None and prep.face is not None:
        prep = dataclasses.replace(prep, face={**prep.face, "refine_steps": refine_steps})
    preparer, tta = ImagePreparer(prep), model.tta
    items = labelled_images(Path(data), classes, limit)
    originals = [load_image(p) for p, _ in items]
    labels = np.array([y for _, y in items])
    rows = {}
    for name in names:
        started = time.perf_counter()
        prepared = [preparer.prepare(DEGRADATIONS[name](im)) for im in originals]
        preds = model.classify([crop for crop, _ in prepared], batch_size).argmax(1)  # recorded TTA, temperature
        correct = int((preds == labels).sum())
        lo, hi = wilson_interval(correct, len(labels))
        rows[name] = {
            "accuracy": correct / len(labels),
            "ci": [lo, hi],
            "n": len(labels),
            "no_face": sum(not found for _, found in prepared) / len(labels) if prep.face else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
    return {
        "model": str(model_path),
        "data": str(data),
        "tta": tta,
        "aligned": prep.face is not None,
        "refine_steps": prep.face.get("refine_steps") if prep.face else None,
        "results": rows,
    }


def named_labels(folders: list[str], model_path: str) -> list[dict]:
    """Predictions for files named `<class>__*.ext` in `folders` (e.g. the shared robustness set's
    known_label_faces): every face found, through `Predictor` as `facegender predict` runs it."""
    from facegender.app.predict import Predictor, expand_paths

    predictor = Predictor.from_file(model_path, device="cpu")
    files = [p for p in expand_paths(folders) if "__" in p.name and p.name.split("__")[0] in predictor.classes]
    rows = []
    for result, path in zip(predictor.predict_paths(files), files):
        rows.append(
            {
                "file": str(path),
                "true": path.name.split("__")[0],
                "status": result.status,
                "labels": [f"{f.label} {f.probability:.3f}" for f in result.faces],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--data", default="../shared/datasets/faces-gdf/test", help="folder with one subfolder per class"
    )
    parser.add_argument("--degradations", nargs="+", default=list(DEGRADATIONS), choices=list(DEGRADATIONS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--limit", type=int, help="at most this many images per class (quick check)")
    parser.add_argument(
        "--refine-steps", type=int, help="override the model's landmark refinement rounds (experiment only)"
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["../shared/datasets/robustness/known_label_faces"],
        help="folders of files named <class>__*.ext to predict one by one",
    )
    args = parser.parse_args()
    report = evaluate_degradations(
        args.model, args.data, args.degradations, limit=args.limit, refine_steps=args.refine_steps
    )
    print(
        f"{report['model']} on {report['data']} (aligned: {report['aligned']}, TTA: {report['tta']}, "
        f"refine_steps: {report['refine_steps']})"
    )
    print(f"{'degradation':<16}{'accuracy':>9}  {'95% CI':<13}{'no face':>8}")
    for name, r in report["results"].items():
        no_face = "-" if r["no_face"] is None else f"{r['no_face']:.1%}"
        print(f"{name:<16}{r['accuracy']:>9.3f}  {r['ci'][0]:.3f}-{r['ci'][1]:.3f}  {no_face:>8}")
    if args.extra:
        report["named"] = named_labels(args.extra, args.model)
        print("\nfiles named <class>__*:")
        for r in report["named"]:
            print(f"  {Path(r['file']).name}: true {r['true']}, predicted {', '.join(r['labels']) or r['status']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
