"""Training recipes compared over seeds: validation (chooses), faces-gdf/test and faces-ood (report).

    python benchmarks/recipe_search.py --candidates frozen ft2 ft3 --seeds 0 1 2 --out runs/recipes

Each candidate is a set of `facegender train` options (CANDIDATES below) trained on the sources of
`--data` (default benchmarks/sources/diverse.yaml: faces-gdf + aaf-adult + congress-past) once
per seed. Every finished run appends one JSON line to OUT/results.jsonl (a rerun skips what is
there), with the validation accuracy and balanced accuracy of the training sources (the only
figures a recipe is chosen on), faces-gdf/test and faces-ood (FairFace: never trained or tuned
on) with per-class recall and every age group and race (`tools.build_default_model.measure`). The table
printed at the end gives each candidate's mean and standard deviation over its seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Fine-tuning dlib's last stages on the cached output of its frozen first ones (--cached-prefix).
_FT = {
    "backbone": "dlib_resnet",
    "image_size": 150,
    "align": True,
    "visible_region": False,
    "frozen_features": False,
    "cached_prefix": True,
    "optimizer": "adamw",
    "weight_decay": 1e-4,
    "monitor": "val_loss",
    "tta": True,
    "batch_size": 64,
    "patience": 3,
    "augment": "strong",
}

CANDIDATES: dict[str, dict] = {
    # the bundled recipe until now: a linear head on the frozen descriptor
    "frozen": {"preset": "frozen"},
    "ft1": {**_FT, "trainable_stages": 1, "lr": 1e-3, "epochs": 10, "feature_views": 4},
    "ft2": {**_FT, "trainable_stages": 2, "lr": 1e-3, "body_lr_scale": 0.3, "epochs": 8, "feature_views": 4},
    "ft2-ls": {
        **_FT,
        "trainable_stages": 2,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "epochs": 8,
        "feature_views": 4,
        "label_smoothing": 0.1,
    },
    "ft2-bal": {
        **_FT,
        "trainable_stages": 2,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "epochs": 8,
        "feature_views": 4,
        "balance": "source",
    },
    "ft2-lr3": {**_FT, "trainable_stages": 2, "lr": 3e-4, "body_lr_scale": 1.0, "epochs": 8, "feature_views": 4},
    "ft2-imfdb": {
        **_FT,
        "trainable_stages": 2,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "epochs": 8,
        "feature_views": 4,
        "data": "diverse-imfdb.yaml",
    },
    "ft2-ema": {
        **_FT,
        "trainable_stages": 2,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "epochs": 8,
        "feature_views": 4,
        "ema": 0.998,
    },
    "ft3-ema": {
        **_FT,
        "trainable_stages": 3,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "epochs": 8,
        "feature_views": 4,
        "ema": 0.998,
    },
    "ft3": {**_FT, "trainable_stages": 3, "lr": 1e-3, "body_lr_scale": 0.3, "epochs": 8, "feature_views": 4},
    "ft3-lr3": {**_FT, "trainable_stages": 3, "lr": 3e-4, "body_lr_scale": 1.0, "epochs": 8, "feature_views": 4},
}

# tools/ (the maintainer tools beside the package) is imported from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(name: str, seed: int, data: list[str], out: Path, shared: Path) -> dict:
    import facegender
    from tools.build_default_model import measure

    options = dict(CANDIDATES[name])
    preset = options.pop("preset", None)
    if "data" in options:  # a candidate with its own sources (benchmarks/sources/)
        data = [str(HERE / "sources" / options.pop("data"))]
    started = time.perf_counter()
    run = facegender.train(
        data, preset=preset, out=out / f"{name}-s{seed}", seed=seed, progress=False, log=lambda s: None, **options
    )
    seconds = time.perf_counter() - started
    val = run.summary["validation"]
    m = measure(run.model_path, shared)
    return {
        "candidate": name,
        "seed": seed,
        "options": CANDIDATES[name],
        "train_seconds": round(seconds, 1),
        "best_epoch": run.summary["best_epoch"],
        "epochs_run": run.summary["epochs_run"],
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "val_by_source": run.summary.get("by_source", {}).get("validation"),
        "gdf_test": m["gdf_test"]["accuracy"],
        "ood": m["ood"],
        "threshold": m.get("threshold"),
    }


def remeasure(rows: list[dict], out: Path, shared: Path) -> list[dict]:
    from tools.build_default_model import measure

    for row in rows:
        m = measure(out / f"{row['candidate']}-s{row['seed']}" / "best_model.pth", shared)
        row.update(gdf_test=m["gdf_test"]["accuracy"], ood=m["ood"], threshold=m.get("threshold"))
    return rows


#: The sources every candidate trains on: their validation images are the same for a seed whatever
#: other sources are added (each source is split on its own), so recipes with more data are compared
#: on these.
COMMON = ("faces-gdf", "aaf-adult", "congress-past")


def common_val(row: dict) -> float:
    """Validation accuracy on the images of the COMMON sources."""
    groups = (row.get("val_by_source") or {}).get("groups", {})
    n = sum(groups[s]["n"] for s in COMMON if s in groups)
    return sum(groups[s]["correct"] for s in COMMON if s in groups) / n if n else row["val_accuracy"]


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| candidate | seeds | validation (gdf+aaf+congress) | faces-gdf/test | faces-ood | female recall "
        "| male recall | "
        "worst age | worst race | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["candidate"] for r in rows):
        rs = [r for r in rows if r["candidate"] == name]
        worst = {col: min(r["ood"]["worst"][col]["accuracy"] for r in rs) for col in ("age_group", "race")}
        lines.append(
            " | ".join(
                [
                    f"| {name}",
                    str(len(rs)),
                    _mean_sd([common_val(r) for r in rs]),
                    _mean_sd([r["gdf_test"] for r in rs]),
                    _mean_sd([r["ood"]["accuracy"] for r in rs]),
                    _mean_sd([r["ood"]["recall"]["female"] for r in rs]),
                    _mean_sd([r["ood"]["recall"]["male"] for r in rs]),
                    f"{worst['age_group']:.3f}",
                    f"{worst['race']:.3f}",
                    f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |",
                ]
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=[str(HERE / "sources" / "diverse.yaml")])
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    parser.add_argument("--out", default="runs/recipes")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the finished runs' models again (after a change to how models decide)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    if args.remeasure:
        rows = remeasure(rows, out, Path(args.shared))
        results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    done = {(r["candidate"], r["seed"]) for r in rows}
    for name in args.candidates:
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            row = run_one(name, seed, args.data, out, Path(args.shared))
            rows.append(row)
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{name} seed {seed}: val {row['val_accuracy']:.3f} gdf {row['gdf_test']:.3f} "
                f"ood {row['ood']['accuracy']:.3f} (F {row['ood']['recall']['female']:.3f} "
                f"M {row['ood']['recall']['male']:.3f}) {row['train_seconds']:.0f} s",
                flush=True,
            )
    print(table([r for r in rows if r["candidate"] in args.candidates and r["seed"] in args.seeds]))


if __name__ == "__main__":
    main()
