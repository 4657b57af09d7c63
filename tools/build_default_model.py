"""Rebuilding the bundled default model (`make default-model`): a maintainer tool, outside the package.

The package ships one trained model (`default_model/gender.onnx`) and its record
(`default_model/gender.json`: file hash, classes, preprocessing, the training data and recipe and
the measured accuracy that docs/model-card.md reports). `facegender predict`, `serve` and
`evaluate` use it when no `--model` is given; `facegender models` prints the record
(`describe_default_model`). The file runs on onnxruntime, without PyTorch, and is one of:

- head-only (`contents: "head-only"`): a model whose body stayed at dlib's pretrained face
  descriptor ships only its head (a few KB); the body is built from the weight file of the
  installed `face_recognition_models` package (`facegender export --head-only`).
- whole-network (`contents: "whole-network"`): a model whose body was fine-tuned ships the whole
  network, stored as fp32, fp16 or int8 (`facegender export --quantize`): the smallest that stays
  within 0.3 points of fp32's accuracy on faces-ood and faces-gdf/test and is under 20 MB
  (`choose_variant`); loading it needs no `face_recognition_models`.

`make default-model` rebuilds both files from ../shared: it trains, then `build_default_model`
exports the run's best_model.pth (checked against PyTorch), measures each exported file (`measure`:
the numbers of docs/recipes.md's comparison and of the model card) and writes the two files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from facegender.core.files import atomic_path, sha256_file, write_text_atomic
from facegender.core.model_card import HEAD_ONLY, REBUILD_COMMAND, WHOLE_NETWORK, _body, _recipe, format_variants
from facegender.core.resources import DEFAULT_DIR, MODEL_FILE, RECORD_FILE
from facegender.evaluation.predictions import predict_labelled
from facegender.training.export import export_model

#: The storage formats a whole-network model is exported in, fp32 (the reference) first.
VARIANTS = ("fp32", "fp16", "int8")
#: A whole-network file ships only below this size (bytes; dlib's network is 22.5 MB in fp32).
MAX_BYTES = 20_000_000
#: ... and only when its accuracy on faces-ood and on faces-gdf/test is at most this much (0.3
#: points) below fp32's. On faces-gdf/test (n=200) one more mistake is already 0.5 points.
MAX_ACCURACY_DROP = 0.003
#: The test sets `choose_variant` compares, as the keys of its rows.
COMPARED = ("faces_ood", "gdf_test")


# ----------------------------------------------------------------------------- choosing the shipped variant

#: The description of the training data of a record that names no sources (the old single dataset).
GDF_TRAIN = "faces-gdf/train (celebrity face crops; labels by the dataset's author)"


def _images(source: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """(training images, per class) of a recorded source: its 'images' (a count, or counts per
    class), else its 'counts' (per split: the train and validation splits; or per class)."""

    def per_class(counts) -> dict[str, int]:
        return {str(c): int(n) for c, n in counts.items()} if isinstance(counts, Mapping) else {}

    if "images" in source:
        images = source["images"]
        if isinstance(images, Mapping):
            by_class = per_class(images)
            return sum(by_class.values()), by_class
        return int(images), {}
    counts = source.get("counts") or {}
    if any(isinstance(v, Mapping) or v is None for v in counts.values()):  # {split: {class: n} or None}
        by_class: dict[str, int] = {}
        for split in ("train", "validation"):
            for c, n in per_class(counts.get(split) or {}).items():
                by_class[c] = by_class.get(c, 0) + n
        return sum(by_class.values()), by_class
    by_class = per_class(counts)
    return sum(by_class.values()), by_class


def training_sources(record: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The training sources of a model record, each as {'name', 'path', 'images', 'by_class',
    'licence'}: from the `sources` list of the record, or of its config or metrics (each entry a
    dict with at least 'path' and 'counts' or 'images'); None when it has none."""
    for holder in (record, record.get("config") or {}, record.get("metrics") or {}):
        items = holder.get("sources") if isinstance(holder, Mapping) else None
        if (
            isinstance(items, list)
            and items
            and all(isinstance(s, Mapping) and "path" in s and ("counts" in s or "images" in s) for s in items)
        ):
            break
    else:
        return None
    out = []
    for s in items:
        images, by_class = _images(s)
        out.append(
            {
                "name": str(s.get("name") or Path(str(s["path"])).name or s["path"]),
                "path": str(s["path"]),
                "images": images,
                "by_class": by_class,
                "licence": s.get("licence"),
            }
        )
    return out


def describe_training(record: Mapping[str, Any]) -> dict[str, Any]:
    """{'data' (readable text: the names of the sources first, then their counts in brackets),
    'images', and 'sources' when the record lists them} for the record's `training` entry."""
    sources = training_sources(record)
    if sources:
        total = sum(s["images"] for s in sources)
        names = " + ".join(s["name"] for s in sources)
        counts = "; ".join(f"{s['name']} {s['images']:,}" for s in sources)
        text = f"{names} ({total:,} training images" + (f": {counts})" if len(sources) > 1 else ")")
        return {"data": text, "images": total, "sources": sources}
    from facegender.data.dataset import scan_dataset

    root = training_dataset((record.get("config") or {}).get("data"))
    _, train, _ = scan_dataset(root, need_test=False)
    text = GDF_TRAIN if root.name == "faces-gdf" else f"{root.name}/train"
    return {"data": text, "images": len(train)}


# ----------------------------------------------------------------------------- the run's training data


def _dataset_paths(data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """The dataset folders of a run config's `data`: one path or a list of them; a sources .yaml
    file stands for the folders it lists."""
    entries = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    paths: list[Path] = []
    for entry in entries:
        if str(entry).lower().endswith((".yaml", ".yml")):
            from facegender.data.sources import read_sources

            paths += [Path(s.path) for s in read_sources([str(entry)])]
        else:
            paths.append(Path(entry))
    return paths


def training_dataset(data: str | os.PathLike | Sequence[str | os.PathLike] | None) -> Path:
    """The dataset whose training images calibrate int8 (and count as the training data of a
    record without sources): of a run config's `data` (a path or a list of them), the first entry
    with a train/ folder, else the first entry."""
    paths = _dataset_paths(data)
    if not paths:
        raise ValueError("the run's config names no training data (its 'data' is empty)")
    return next((p for p in paths if (p / "train").is_dir()), paths[0])


def judge_variants(
    rows: Mapping[str, Mapping[str, Any]], max_bytes: int = MAX_BYTES, max_drop: float = MAX_ACCURACY_DROP
) -> dict[str, str | None]:
    """For each exported variant (`rows`: name -> {'bytes', 'faces_ood', 'gdf_test'} accuracies, or
    {'error': why its export failed}), None when it may ship, else why not: over `max_bytes`, or
    more than `max_drop` below fp32's accuracy on one of the COMPARED test sets. fp32 (the
    reference) must be among the rows and measured."""
    reference = rows.get("fp32")
    if not reference or reference.get("error"):
        raise ValueError(
            "the fp32 export is the reference of the comparison; it is missing or failed"
            + (f": {reference['error']}" if reference else "")
        )
    verdicts: dict[str, str | None] = {}
    for name, row in rows.items():
        if row.get("error"):
            verdicts[name] = f"export failed: {row['error']}"
            continue
        reasons = (
            [f"{row['bytes'] / 1e6:.2f} MB is not under {max_bytes / 1e6:g} MB"] if row["bytes"] >= max_bytes else []
        )
        for key in COMPARED:
            drop = float(reference[key]) - float(row[key])
            if drop > max_drop + 1e-9:
                reasons.append(
                    f"{key} accuracy {row[key]:.4f} is {100 * drop:.2f} points below fp32's "
                    f"{reference[key]:.4f} (at most {100 * max_drop:g} allowed)"
                )
        verdicts[name] = "; ".join(reasons) or None
    return verdicts


def choose_variant(
    rows: Mapping[str, Mapping[str, Any]], max_bytes: int = MAX_BYTES, max_drop: float = MAX_ACCURACY_DROP
) -> str:
    """The variant to ship: the smallest file among those `judge_variants` lets ship. ValueError,
    saying what each variant lacked, when none qualifies."""
    verdicts = judge_variants(rows, max_bytes, max_drop)
    fit = [name for name, why in verdicts.items() if why is None]
    if not fit:
        raise ValueError(
            f"no export of this model can be the bundled one (it must be under {max_bytes / 1e6:g} MB "
            f"and within {100 * max_drop:g} points of fp32 on faces-ood and faces-gdf/test): "
            + "; ".join(f"{name}: {why}" for name, why in verdicts.items())
        )
    return min(fit, key=lambda name: (rows[name]["bytes"], VARIANTS.index(name) if name in VARIANTS else 99))


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
        faces = sorted(result.faces, key=lambda f: f.box[0])
        for i, face in enumerate(faces):
            expected = truth[i] if i < len(truth) else None
            right += face.label == expected
            faces_out.append(
                {
                    "photo": Path(rel).name,
                    "face": i + 1,
                    "label": face.label,
                    "probability": round(float(face.probability), 3),
                    "expected": expected,
                }
            )
    return {"right": right, "total": sum(len(t) for t in SAMPLES.values()), "faces": faces_out}


def _rates(labels, preds, classes: Sequence[str]) -> dict[str, Any]:
    """n, accuracy with its Wilson 95% interval, and per-class n, recall and recall interval."""
    import numpy as np

    from facegender.evaluation.metrics import wilson_interval

    correct = int(np.sum(preds == labels))
    out: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": correct / len(labels) if len(labels) else None,
        "ci": list(wilson_interval(correct, len(labels))),
        "recall": {},
        "recall_ci": {},
        "class_n": {},
    }
    for i, c in enumerate(classes):
        mask = labels == i
        hits = int(np.sum(preds[mask] == i))
        out["class_n"][c] = int(mask.sum())
        out["recall"][c] = hits / int(mask.sum()) if mask.any() else None
        out["recall_ci"][c] = list(wilson_interval(hits, int(mask.sum())))
    return out


def measure(model_path: str | os.PathLike, shared: str | os.PathLike) -> dict[str, Any]:
    """A model on the development sets: faces-gdf/test accuracy (Wilson 95% interval); faces-ood
    accuracy (with its interval), per-class recall (`recall`, with `recall_ci` and `class_n`), the
    worst age group and race (of groups of 10 or more) and every age group and race (`groups`:
    n, accuracy, its interval `ci`, per-class `recall`); the sample photos."""
    import numpy as np

    from facegender.core.model import load
    from facegender.evaluation.metrics import expected_calibration_error, per_group_metrics

    shared = Path(shared)
    model = load(model_path, device="cpu")
    row: dict[str, Any] = {"model": str(model_path), "threshold": model.threshold}
    gdf = predict_labelled(model, shared / "datasets/faces-gdf/test", log=lambda s: None, progress=False)
    rates = _rates(gdf.labels, gdf.predicted(), model.classes)
    row["gdf_test"] = {
        "accuracy": rates["accuracy"],
        "n": rates["n"],
        "ci": rates["ci"],
        "ece": expected_calibration_error(gdf.probs(), gdf.labels),
    }
    ood = predict_labelled(model, shared / "datasets/faces-ood", log=lambda s: None, progress=False)
    preds = ood.predicted()
    rates = _rates(ood.labels, preds, model.classes)
    columns = _ood_groups(shared, ood.paths)
    groups = per_group_metrics(ood.labels, preds, columns, model.classes, min_count=10)
    detail = {}
    for col, values in columns.items():
        values = np.array(values, dtype=object)
        detail[col] = {}
        for g in sorted(set(values.tolist())):
            r = _rates(ood.labels[values == g], preds[values == g], model.classes)
            detail[col][g] = {
                "n": r["n"],
                "accuracy": round(r["accuracy"], 4),
                "ci": [round(x, 4) for x in r["ci"]],
                "recall": {c: None if v is None else round(v, 4) for c, v in r["recall"].items()},
            }
    row["ood"] = {
        "accuracy": rates["accuracy"],
        "n": rates["n"],
        "ci": rates["ci"],
        "recall": rates["recall"],
        "recall_ci": rates["recall_ci"],
        "class_n": rates["class_n"],
        "ece": expected_calibration_error(ood.probs(), ood.labels),
        "worst": {col: {"group": g["worst_group"], "accuracy": g["worst_accuracy"]} for col, g in groups.items()},
        "groups": detail,
    }
    row["samples"] = _sample_photos(model, shared)
    return row


def format_measurement(row: dict[str, Any]) -> str:
    """The model's name, then a one-line summary of `measure`'s row."""
    g, o, s = row["gdf_test"], row["ood"], row["samples"]
    worst = ", ".join(f"{w['group']} {w['accuracy']:.3f}" for w in o["worst"].values())
    rec = " ".join(f"{c} {r:.3f}" for c, r in o["recall"].items())
    return (
        f"{row['model']}\n  faces-gdf/test {g['accuracy']:.3f} ({g['ci'][0]:.3f}-{g['ci'][1]:.3f}, n={g['n']})"
        f" | faces-ood {o['accuracy']:.3f} (n={o['n']}; recall {rec}; worst {worst})"
        f" | sample photos {s['right']}/{s['total']}"
    )


def _variant_row(report: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    """What the record keeps of one exported variant: size, parity, and its measured accuracy."""
    return {
        "bytes": report["bytes"],
        "parity_max_abs_diff": report["parity_max_abs_diff"],
        "gdf_test": measured["gdf_test"]["accuracy"],
        "faces_ood": measured["ood"]["accuracy"],
        "faces_ood_recall": measured["ood"]["recall"],
        "samples_right": f"{measured['samples']['right']}/{measured['samples']['total']}",
    }


def build_default_model(
    model_path: str | os.PathLike, shared: str | os.PathLike, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Make a trained model (best_model.pth) the bundled default model, and write its record with
    the accuracy of the shipped file measured now on faces-gdf/test, faces-ood and the sample
    photos under `shared`.

    A body at dlib's pretrained package weights ships head-only. Any other (a fine-tuned body) is
    exported whole as fp32, fp16 and int8 (calibrated on the run's training images,
    `training_dataset`), each measured, and the smallest that `choose_variant` accepts ships; the
    record keeps all three (`variants`). Nothing in the package changes when an export, its parity
    check or the choice fails."""
    from facegender.core.model import load
    from facegender.training import checkpoint as ckpt
    from facegender.training.backbones import get_spec
    from facegender.training.export import ParityError

    record = ckpt.load_file(model_path)
    cfg = record["config"]
    shared = Path(shared)
    head_only = record.get("body_weights") == "pretrained"
    model = load(model_path, device="cpu", detect=False)
    parity_data = shared / "datasets/faces-gdf"
    training = describe_training(record)
    variants: dict[str, dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory() as scratch:
        if head_only:
            quantization, path = "fp32", Path(scratch) / "head.onnx"
            export_model(model, path, data=parity_data, head_only=True, log=log)
            measured = measure(path, shared)
            log(format_measurement(measured))
        else:
            calibration = training_dataset(cfg.get("data"))
            variants, rows = {}, {}
            for q in VARIANTS:
                path = Path(scratch) / f"{q}.onnx"
                try:
                    report = export_model(
                        model,
                        path,
                        data=parity_data,
                        quantize=None if q == "fp32" else q,
                        calibration=calibration if q == "int8" else None,
                        log=log,
                    )
                except ParityError as exc:
                    if q == "fp32":
                        raise
                    log(f"{q}: {exc}")
                    variants[q] = {"error": str(exc)}
                    continue
                rows[q] = measure(path, shared)
                log(format_measurement(rows[q]))
                variants[q] = _variant_row(report, rows[q])
            verdicts = judge_variants(variants)
            quantization = choose_variant(variants)
            for q, why in verdicts.items():
                variants[q]["verdict"] = "shipped" if q == quantization else (why or "fits, but a smaller one does too")
            log(f"shipping {quantization}: {format_variants(variants, quantization)}")
            path, measured = Path(scratch) / f"{quantization}.onnx", rows[quantization]
        DEFAULT_DIR.mkdir(exist_ok=True)
        target = DEFAULT_DIR / MODEL_FILE
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
    if head_only:
        source = (
            "best_model.pth of the run, exported with `facegender export --head-only` (parity with "
            "PyTorch checked on faces-gdf/test images)"
        )
        body = "body frozen, from the installed face_recognition_models package"
    else:
        flag = "" if quantization == "fp32" else f" --quantize {quantization}"
        source = (
            f"best_model.pth of the run, exported whole with `facegender export{flag}` (parity with PyTorch "
            "checked on faces-gdf/test images): the smallest of fp32, fp16 and int8 under "
            f"{MAX_BYTES / 1e6:g} MB and within {100 * MAX_ACCURACY_DROP:g} points of fp32 on faces-ood and "
            "faces-gdf/test"
        )
        body = f"{_body(cfg)}, stored in the file"
    out = {
        "file": MODEL_FILE,
        "contents": HEAD_ONLY if head_only else WHOLE_NETWORK,
        "quantization": quantization,
        "source": source,
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        "backbone": record["backbone"],
        "pretrained_on": get_spec(record["backbone"]).pretrained_on,
        "body": body,
        "classes": record["classes"],
        "preprocessing": record["preprocessing"],
        "temperature": record.get("temperature", 1.0),
        "tta": record.get("tta", False),
        "training": {
            **training,
            "validation_fraction": cfg["val_fraction"],
            "recipe": _recipe(cfg),
            "config": cfg,
            "metrics": record.get("metrics"),
        },
        "measured": {"gdf_test": measured["gdf_test"], "faces_ood": measured["ood"], "samples": measured["samples"]},
        **({"variants": variants} if variants else {}),
        "rebuild": REBUILD_COMMAND,
    }
    write_text_atomic(json.dumps(out, indent=1, default=float) + "\n", DEFAULT_DIR / RECORD_FILE)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m tools.build_default_model MODEL --shared ../shared` (what `make default-model` runs)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tools.build_default_model",
        allow_abbrev=False,
        description="Make a trained model the bundled default model.",
    )
    parser.add_argument(
        "model",
        help="best_model.pth of the run (a frozen body ships head-only, a fine-tuned one whole: fp32, fp16 or int8)",
    )
    parser.add_argument("--shared", default="../shared", help="the shared development data")
    args = parser.parse_args(argv)
    out = build_default_model(args.model, args.shared)
    print(
        f"wrote {DEFAULT_DIR / MODEL_FILE} ({out['contents']}, {out['quantization']}, {out['bytes']} bytes, "
        f"sha256 {out['sha256'][:12]}) and "
        f"{DEFAULT_DIR / RECORD_FILE}; update docs/model-card.md with these numbers"
    )


if __name__ == "__main__":
    main()
