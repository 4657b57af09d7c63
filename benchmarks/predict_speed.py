"""End-to-end prediction time for one photo with one face (the shipped 512x512 JPEG sample by default): face
detection, landmark refinement, alignment and classification (and decoding the file), in ms per
image, in one process.

    python benchmarks/predict_speed.py [--model M.onnx|best_model.pth ...] [--image PHOTO] [--repeat 20]

Per model (default: the bundled one): the stages alone, then file -> labelled faces for each
landmark refinement setting (0, 1, 2 rounds) with and without flip TTA. The model records the
setting it was trained with, and `predict` uses that one unless told otherwise (`--refine-steps`,
`--tta/--no-tta`); benchmarks/predict_tradeoffs.py gives the accuracy of each. Threads: the ONNX
Runtime (and PyTorch) defaults, capped at 2 (this machine's cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SAMPLE = str(Path(__file__).resolve().parents[1] / "src" / "facegender" / "core" / "samples" / "astronaut.jpg")


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn()` over `repeat` runs, after two warm-up runs."""
    fn(), fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=[None], help="model files (default: the bundled model)")
    parser.add_argument("--image", default=SAMPLE, help="the photo (default: the shipped 512x512 JPEG sample)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import facegender
    from facegender.core.images import load_image

    image = load_image(args.image)
    print(f"{args.image} {image.width}x{image.height}")
    for path in args.model:
        base = facegender.load(path, device="cpu", threads=2)
        if base.face_config is None:
            raise SystemExit(f"{path}: not trained on aligned faces; nothing to detect")
        print(
            f"\nmodel {path or 'bundled'} ({base.info.get('backbone')}, {base.runtime} {base.precision}, input "
            f"{base.prep.image_size}, trained with refine_steps={base.face_config.refine_steps}, TTA {base.tta})"
        )
        crop = base._crops(image)[0].pixels
        print("stages alone (median ms):")
        for tta in (False, True):
            model = base.replace(tta=tta)
            ms = timed(lambda model=model, crop=crop: model.classify([crop]), args.repeat)
            print(f"  classify 1 crop, TTA {tta}: {ms:.1f}")
        for steps in (0, 1, 2):
            model = facegender.load(path, device="cpu", threads=2, refine_steps=steps)
            print(
                f"  detect + refine {steps} + align: {timed(lambda model=model: model._crops(image), args.repeat):.1f}"
            )
        print("end to end, file -> labelled faces (median ms per image):")
        print(f"  {'TTA':<6}" + "".join(f"{f'refine {s}':>10}" for s in (0, 1, 2)))
        for tta in (False, True):
            row = []
            for steps in (0, 1, 2):
                model = facegender.load(path, device="cpu", threads=2, refine_steps=steps, tta=tta)
                row.append(timed(lambda model=model: model.predict(args.image), args.repeat))
            print(f"  {str(tta):<6}" + "".join(f"{ms:>10.1f}" for ms in row))


if __name__ == "__main__":
    main()
