"""End-to-end prediction time for one 512x512 photo with one face: face detection, landmark
refinement, alignment and classification (and decoding the file), in ms per image.

    python benchmarks/predict_speed.py --model output/best_model.pth [--image PHOTO] [--repeat 20]

Rows: each landmark refinement setting (0, 1, 2 rounds; the model records which one it was trained
with, and `predict` uses that one: the other rows only show what a retrained model would cost),
with the PyTorch classifier, and with onnxruntime when `facegender.export` is available. Also the
stages alone. Threads: the PyTorch/ONNX Runtime defaults, capped at 2 (this machine's cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ASTRONAUT = str(Path(__file__).resolve().parents[1] / ".." / "shared" / "images" / "astronaut_female.png")


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn()` over `repeat` runs, after two warm-up runs."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def predictor_with(base, refine_steps: int, tta: bool | None = None):
    """A Predictor like `base` but whose detector refines landmarks `refine_steps` times."""
    import dataclasses

    from facegender.predict import Predictor

    prep = dataclasses.replace(base.prep, face={**base.prep.face, "refine_steps": refine_steps})
    return Predictor(base.classes, prep, base.backend, base.temperature, base.tta if tta is None else tta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="best_model.pth of a model trained with --align")
    parser.add_argument("--image", default=ASTRONAUT)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    from facegender.images import load_image
    from facegender.predict import Predictor

    base = Predictor.from_file(args.model, device="cpu")
    if base.prep.face is None:
        raise SystemExit(f"{args.model}: not trained on aligned faces; nothing to detect")
    image = load_image(args.image)
    trained_steps = base.prep.face.get("refine_steps")
    print(f"{args.image} {image.width}x{image.height}; model {args.model} "
          f"({base.info.get('backbone')}, input {base.prep.image_size}, TTA {base.tta}, "
          f"trained with refine_steps={trained_steps})")

    backends = {"pytorch": base.backend}
    try:
        from facegender.export import load_onnx_classifier

        onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
        base.export(onnx_path, log=lambda s: None)
        backends["onnxruntime"] = load_onnx_classifier(onnx_path)[0]
    except ImportError as exc:
        print(f"(onnxruntime classifier skipped: {exc})")

    crop = base._crops(0, image)[0].tensor
    print("\nstages alone (median ms):")
    for name, fn in backends.items():
        base.backend = fn
        for tta in (False, True):
            base.tta = tta
            print(f"  classify 1 crop, {name}, TTA {tta}: {timed(lambda: base.classify([crop]), args.repeat):.1f}")
    for steps in (0, 1, 2):
        p = predictor_with(base, steps)
        print(f"  detect + refine {steps} + align: {timed(lambda: p._crops(0, image), args.repeat):.1f}")

    print("\nend to end, file -> labelled faces (median ms per image):")
    print(f"  {'classifier':<12}{'TTA':<6}" + "".join(f"{f'refine {s}':>10}" for s in (0, 1, 2)))
    for name, fn in backends.items():
        for tta in (False, True):
            row = []
            for steps in (0, 1, 2):
                p = predictor_with(base, steps, tta)
                p.backend = fn
                row.append(timed(lambda: p.predict_paths([args.image]), args.repeat))
            print(f"  {name:<12}{str(tta):<6}" + "".join(f"{ms:>10.1f}" for ms in row))


if __name__ == "__main__":
    main()
