"""The bundled default model: where it lives, what it is, and how it is rebuilt.

The package ships one small trained model (`default_model/gender.onnx`: the head-only ONNX export
of a head on the frozen dlib face descriptor, whose weights come from the installed
`face_recognition_models` package; it runs on onnxruntime, without PyTorch) and its record
(`default_model/gender.json`: file hash, classes, preprocessing, the training recipe and the
measured accuracy that docs/model-card.md reports). `facegender predict`, `serve` and `evaluate`
use it when no `--model` is given; `facegender models` prints the record.

`make default-model` rebuilds both from ../shared: it trains with `--preset best` on
faces-gdf/train, then `build_default_model` exports the head (`facegender export --head-only`,
checked against PyTorch), measures the exported file (`measure`: the numbers of the README's
recipe table and of the model card) and writes the two files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from facegender.files import sha256_file
from facegender.resources import DEFAULT_DIR, MODEL_FILE, RECORD_FILE, default_model_path, default_model_record

REBUILD_COMMAND = "make default-model"


def describe_default_model() -> str:
    """What `facegender models` prints."""
    r = default_model_record()
    m = r["measured"]
    ood = m["faces_ood"]
    recall = ", ".join(f"{c} {v:.3f}" for c, v in ood["recall"].items())
    lines = [
        f"bundled default model: {default_model_path()}",
        f"  backbone      {r['backbone']} (pretrained on {r['pretrained_on']}; body frozen, from the installed "
        "face_recognition_models package)",
        f"  classes       {', '.join(r['classes'])}",
        f"  training data {r['training']['data']}: {r['training']['images']} images, "
        f"{r['training']['validation_fraction']:.0%} of them held out for validation",
        f"  recipe        {r['training']['recipe']}",
        f"  faces-gdf/test accuracy {m['gdf_test']['accuracy']:.3f} (n={m['gdf_test']['n']})",
        f"  faces-ood (FairFace, other source) accuracy {ood['accuracy']:.3f} (n={ood['n']}); recall {recall}",
        f"  sample photos {m['samples']['right']}/{m['samples']['total']} faces right",
        f"  sha256        {r['sha256']}",
        "  model card    docs/model-card.md (intended use, limits, per-group accuracy)",
        f"  rebuild with  {REBUILD_COMMAND}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring on ../shared

#: The shared sample photos and their faces from left to right.
SAMPLES = {
    "images/group_6_faces.jpg": ["female", "female", "male", "male", "male", "female"],
    "images/astronaut_female.png": ["female"],
}


def _ood_groups(shared: Path, paths: list) -> dict[str, list[str]]:
    import csv

    with open(shared / "datasets/faces-ood/manifest.csv", newline="", encoding="utf-8") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    return {col: [rows[Path(p).name][col] for p in paths] for col in ("age_group", "race")}


def _sample_photos(model, shared: Path) -> dict[str, Any]:
    right, faces_out = 0, []
    for rel, truth in SAMPLES.items():
        (result,) = model.predict([shared / rel])
        faces = sorted(result.get("faces", []), key=lambda f: f["box"][0])
        for i, face in enumerate(faces):
            expected = truth[i] if i < len(truth) else None
            right += face["label"] == expected
            faces_out.append({"photo": Path(rel).name, "face": i + 1, "label": face["label"],
                              "probability": round(float(face["probability"]), 3), "expected": expected})
    return {"right": right, "total": sum(len(t) for t in SAMPLES.values()), "faces": faces_out}


def measure(model_path: str | os.PathLike, shared: str | os.PathLike) -> dict[str, Any]:
    """A model on the development sets: faces-gdf/test accuracy (Wilson 95% interval); faces-ood
    accuracy, per-class recall and per age group / race (groups of 10 or more); the sample photos."""
    import numpy as np

    from facegender.inference import load
    from facegender.metrics import expected_calibration_error, per_group_metrics, wilson_interval

    shared = Path(shared)
    model = load(model_path, device="cpu")
    row: dict[str, Any] = {"model": str(model_path)}
    gdf = model.evaluate(shared / "datasets/faces-gdf/test", log=lambda s: None, progress=False)
    correct = int((gdf.logits.argmax(1) == gdf.labels).sum())
    row["gdf_test"] = {"accuracy": correct / len(gdf.labels), "n": len(gdf.labels),
                       "ci": list(wilson_interval(correct, len(gdf.labels))),
                       "ece": expected_calibration_error(gdf.probs(), gdf.labels)}
    ood = model.evaluate(shared / "datasets/faces-ood", log=lambda s: None, progress=False)
    preds = ood.logits.argmax(1)
    recall = {c: float(np.mean(preds[ood.labels == i] == i)) for i, c in enumerate(model.classes)}
    groups = per_group_metrics(ood.labels, preds, _ood_groups(shared, ood.paths), model.classes, min_count=10)
    row["ood"] = {"accuracy": float(np.mean(preds == ood.labels)), "n": len(ood.labels), "recall": recall,
                  "ece": expected_calibration_error(ood.probs(), ood.labels),
                  "worst": {col: {"group": g["worst_group"], "accuracy": g["worst_accuracy"]}
                            for col, g in groups.items()},
                  "groups": {col: {k: {"n": v["n"], "accuracy": round(v["accuracy"], 4)}
                                   for k, v in g["groups"].items()} for col, g in groups.items()}}
    row["samples"] = _sample_photos(model, shared)
    return row


def format_measurement(row: dict[str, Any]) -> str:
    g, o, s = row["gdf_test"], row["ood"], row["samples"]
    worst = ", ".join(f"{w['group']} {w['accuracy']:.3f}" for w in o["worst"].values())
    rec = " ".join(f"{c} {r:.3f}" for c, r in o["recall"].items())
    return (f"{row['model']}\n  faces-gdf/test {g['accuracy']:.3f} ({g['ci'][0]:.3f}-{g['ci'][1]:.3f}, n={g['n']})"
            f" | faces-ood {o['accuracy']:.3f} (n={o['n']}; recall {rec}; worst {worst})"
            f" | sample photos {s['right']}/{s['total']}")


def build_default_model(model_path: str | os.PathLike, shared: str | os.PathLike,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export a trained model (best_model.pth) head-only into the package as the default model and
    write its record, with the accuracy of the exported file measured now on faces-gdf/test,
    faces-ood and the sample photos under `shared`."""
    from facegender import checkpoint as ckpt
    from facegender.data import scan_dataset
    from facegender.inference import load
    from facegender.model import get_spec

    record = ckpt.load_file(model_path)
    if record.get("body_weights") != "pretrained":
        raise ValueError(f"{model_path}: the bundled model must keep its body at the packaged pretrained "
                         "weights (frozen features), so the file stays small")
    DEFAULT_DIR.mkdir(exist_ok=True)
    target = DEFAULT_DIR / MODEL_FILE
    load(model_path, device="cpu", detect=False).export(target, data=Path(shared) / "datasets/faces-gdf",
                                                        head_only=True, log=log)
    measured = measure(target, shared)
    log(format_measurement(measured))
    cfg = record["config"]
    _, train, _ = scan_dataset(cfg["data"])
    out = {
        "file": MODEL_FILE,
        "source": "best_model.pth of the run, exported with `facegender export --head-only` (parity with "
                  "PyTorch checked on faces-gdf/test images)",
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        "backbone": record["backbone"],
        "pretrained_on": get_spec(record["backbone"]).pretrained_on,
        "classes": record["classes"],
        "preprocessing": record["preprocessing"],
        "temperature": record.get("temperature", 1.0),
        "tta": record.get("tta", False),
        "training": {
            "data": "faces-gdf/train (celebrity face crops; labels by the dataset's author)",
            "images": len(train),
            "validation_fraction": cfg["val_fraction"],
            "recipe": f"facegender train --preset {cfg.get('preset')}",
            "config": cfg,
            "metrics": record.get("metrics"),
        },
        "measured": {"gdf_test": measured["gdf_test"], "faces_ood": measured["ood"],
                     "samples": measured["samples"]},
        "rebuild": REBUILD_COMMAND,
    }
    (DEFAULT_DIR / RECORD_FILE).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m facegender.bundle MODEL --shared ../shared` (what `make default-model` runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m facegender.bundle", allow_abbrev=False,
                                     description="Make a trained model the bundled default model.")
    parser.add_argument("model", help="best_model.pth of a run with --preset best on faces-gdf")
    parser.add_argument("--shared", default="../shared", help="the shared development data")
    args = parser.parse_args(argv)
    out = build_default_model(args.model, args.shared)
    print(f"wrote {DEFAULT_DIR / MODEL_FILE} ({out['bytes']} bytes, sha256 {out['sha256'][:12]}) and "
          f"{DEFAULT_DIR / RECORD_FILE}; update docs/model-card.md with these numbers")


if __name__ == "__main__":
    main()
