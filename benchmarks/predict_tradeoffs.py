"""Speed against accuracy of the prediction settings: landmark refinement rounds and flip TTA, for
one or more models (e.g. the bundled fp32 model and an int8 export), in one process.

    python benchmarks/predict_tradeoffs.py [--model M.onnx ...] [--data DIR ...] [--refine 0 1 2]

Each setting predicts on every photo of the labelled folders (male/ and female/ subfolders; by
default faces-gdf/test and faces-ood from ../shared), as `facegender predict` does: faces found,
aligned and classified, a photo's label is that of its largest face, and a photo without a face
counts as wrong. Printed per setting: accuracy on each folder, ms per photo over all of them (wall
time of `Model.predict` on the whole list, so decoding, the worker threads and classifier batching
are included), and the accuracy points lost against the most accurate setting per ms saved against
the slowest. Run it on an otherwise idle machine; the settings are interleaved over `--repeat`
rounds and the median time is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
DEFAULT_DATA = [SHARED / "faces-gdf" / "test", SHARED / "faces-ood"]


def labelled_photos(folder: Path) -> list[tuple[str, str]]:
    from facegender.core.images import expand_paths

    return [(str(p), p.parent.name) for p in expand_paths([folder]) if p.parent.name in ("male", "female")]


def correct(model, photos: list[tuple[str, str]]) -> tuple[list[bool], int]:
    """Whether each photo's largest face got its folder's label, and how many had no face."""
    results = model.predict([p for p, _ in photos])
    right = [bool(r.faces) and r.faces[0].predicted_class == label for r, (_, label) in zip(results, photos)]
    return right, sum(not r.faces for r in results)


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Photos right only under a, only under b, and the exact two-sided McNemar p-value."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    return only_a, only_b, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=[None], help="model files (default: the bundled model)")
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, help="labelled folders")
    ap.add_argument("--refine", nargs="+", type=int, default=[0, 1, 2], help="refinement rounds to try")
    ap.add_argument("--repeat", type=int, default=1, help="timing rounds (the median is printed)")
    args = ap.parse_args()

    import facegender

    sets = {
        d.parent.name + "/" + d.name if d.name == "test" else d.name: labelled_photos(d)
        for d in args.data
        if d.is_dir()
    }
    if not sets:
        raise SystemExit(f"none of {', '.join(map(str, args.data))} exists")
    every = [p for photos in sets.values() for p, _ in photos]
    rows = []
    for path in args.model:
        base = facegender.load(path)
        name = Path(path).name if path else "bundled"
        for refine in args.refine:
            for tta in (False, True):
                model = facegender.load(path, refine_steps=refine, tta=tta)
                model.predict(every[:4])  # warm up
                right = {s: correct(model, photos) for s, photos in sets.items()}
                acc = {s: (sum(r) / len(r), n) for s, (r, n) in right.items()}
                rows.append(
                    {
                        "model": name,
                        "refine": refine,
                        "tta": tta,
                        "acc": acc,
                        "right": right,
                        "model_obj": model,
                        "trained": refine == base.face_config.refine_steps and tta == base.tta,
                    }
                )
    times: dict[int, list[float]] = {i: [] for i in range(len(rows))}
    for _ in range(args.repeat):
        for i, row in enumerate(rows):
            start = time.perf_counter()
            row["model_obj"].predict(every)
            times[i].append((time.perf_counter() - start) * 1000 / len(every))
    print(
        f"{len(every)} photos ({', '.join(f'{s} {len(p)}' for s, p in sets.items())}); "
        f"median of {args.repeat} timing round(s)"
    )
    header = (
        f"{'model':<14} {'refine':>6} {'tta':>4} "
        + " ".join(f"{s + ' (no face)':>24}" for s in sets)
        + f" {'ms/photo':>9}"
    )
    print(header)
    for i, row in enumerate(rows):
        row["ms"] = statistics.median(times[i])
        cells = " ".join(f"{a:>15.3f} ({n:>3})     " for a, n in row["acc"].values())
        mark = "  <- as trained" if row["trained"] else ""
        print(
            f"{row['model']:<14} {row['refine']:>6} {'yes' if row['tta'] else 'no':>4} {cells} {row['ms']:>9.1f}{mark}"
        )
    print("\nmean accuracy over the folders, and per ms against the slowest setting of the same model:")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model_name]
        slow = max(own, key=lambda r: r["ms"])
        for r in own:
            mean = statistics.mean(a for a, _ in r["acc"].values())
            slow_mean = statistics.mean(a for a, _ in slow["acc"].values())
            saved = slow["ms"] - r["ms"]
            per_ms = f"{(slow_mean - mean) * 100 / saved:+.3f} points lost per ms saved" if saved > 0.5 else ""
            print(
                f"  {model_name} refine {r['refine']} tta {'yes' if r['tta'] else 'no '}: "
                f"{mean:.4f}, {r['ms']:.1f} ms/photo  {per_ms}"
            )
    print(
        "\npaired against the trained setting of the same model (photos right only with it / only with the "
        "other setting, exact McNemar p):"
    )
    for model_name in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model_name]
        trained = next((r for r in own if r["trained"]), None)
        for r in own:
            if trained is None or r is trained:
                continue
            cells = []
            for s in sets:
                a, b, p = mcnemar(trained["right"][s][0], r["right"][s][0])
                cells.append(f"{s} {a}/{b} p={p:.2f}")
            print(f"  {model_name} refine {r['refine']} tta {'yes' if r['tta'] else 'no '}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
