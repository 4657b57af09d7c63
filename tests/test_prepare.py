"""`facegender prepare` (align a dataset once) and `facegender import` through the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import make_dataset, make_image, shared_path
from PIL import Image


def _prepare(raw, out, **kwargs):
    from facegender.data.prepare import prepare_dataset

    kwargs.setdefault("face", {"size": 64})
    return prepare_dataset(raw, out, progress=False, log=lambda s: None, **kwargs)


def test_prepare_writes_same_tree_report_and_marker(tmp_path):
    from facegender.data.prepare import MARKER, REPORT_JSON, REPORT_TXT

    raw = make_dataset(tmp_path / "raw", n_train=3, n_test=2)
    (raw / "train" / "pria" / "extra.png").write_bytes((raw / "train" / "pria" / "pria_000.jpg").read_bytes())
    result = _prepare(raw, tmp_path / "out", fmt="png")
    sources = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    outputs = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.png"))
    # same relative paths, new extension; extra.png and pria_000.jpg do not collide in name
    assert outputs == sorted(s.with_suffix(".png") for s in sources)
    for p in outputs:
        with Image.open(tmp_path / "out" / p) as im:
            assert im.size == (64, 64)
    report = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    # synthetic stripes have no face: listed, and written as the centred training fallback
    assert report["counts"]["images"] == len(sources) == report["counts"]["no_face"]
    assert set(report["no_face"]) == {str(s) for s in sources}
    assert result.written == len(sources) and result.reused == 0
    assert "no face found" in (tmp_path / "out" / REPORT_TXT).read_text()
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["complete"] and marker["face"]["size"] == 64 and marker["classes"] == ["pria", "wanita"]


def test_prepare_is_resumable_and_redoes_changed_sources(tmp_path):
    raw = make_dataset(tmp_path / "raw", n_train=2, n_test=1)
    out = tmp_path / "out"
    first = _prepare(raw, out)
    n = first.written
    again = _prepare(raw, out)
    assert again.written == 0 and again.reused == n
    assert again.report["counts"]["no_face"] == n  # statuses kept from the first run
    src = raw / "train" / "wanita" / "wanita_001.jpg"
    later = (out / "train" / "wanita" / "wanita_001.jpg").stat().st_mtime + 10
    os.utime(src, (later, later))
    third = _prepare(raw, out)
    assert third.written == 1 and third.reused == n - 1
    other = _prepare(raw, out, face={"size": 64, "margin": 0.5})  # other settings: everything again
    assert other.written == n


def test_several_faces_largest_kept_or_left_out(tmp_path):
    group = shared_path("images", "group_6_faces.jpg")
    raw = make_dataset(tmp_path / "raw", n_train=2, n_test=1)
    shutil.copy(group, raw / "train" / "wanita" / "group.jpg")
    kept = _prepare(raw, tmp_path / "kept")
    assert kept.report["multiple_faces"] == [{"file": "train/wanita/group.jpg", "faces": 6}]
    assert (tmp_path / "kept" / "train" / "wanita" / "group.jpg").is_file()
    skipped = _prepare(raw, tmp_path / "single", single_face_only=True)
    assert skipped.report["skipped_multiple_faces"] == [{"file": "train/wanita/group.jpg", "faces": 6}]
    assert not (tmp_path / "single" / "train" / "wanita" / "group.jpg").exists()


def test_unreadable_files_fail_unless_skip_bad(tmp_path):
    from facegender.data.dataset import DatasetError
    from facegender.data.prepare import read_marker

    raw = make_dataset(tmp_path / "raw", n_train=2, n_test=1)
    (raw / "train" / "pria" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.jpg"):
        _prepare(raw, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert [u["file"] for u in report["unreadable"]] == ["train/pria/broken.jpg"]
    with pytest.raises(DatasetError, match="did not finish"):  # training refuses the half-made folder
        read_marker(tmp_path / "out")
    done = _prepare(raw, tmp_path / "out", skip_bad=True)
    assert done.report["counts"]["unreadable"] == 1
    assert read_marker(tmp_path / "out")["complete"]


def test_trained_on_prepared_folder_records_face_and_does_not_align_again(tmp_path, monkeypatch):
    """The prepared folder trains as is; the model records the face stage (predict then detects),
    and neither training nor evaluating on the prepared test/ runs the detector again."""
    from facegender.app.cli import main
    from facegender.app.predict import Predictor
    from facegender.core.faces.detect import FaceDetector
    from facegender.evaluation.evaluate import evaluate_model
    from facegender.training.config import build_config
    from facegender.training.train import train

    raw = make_dataset(tmp_path / "raw", n_train=5, n_test=2)
    assert main(["prepare", "--data", str(raw), "--out", str(tmp_path / "aligned"), "--size", "64", "--quiet"]) == 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_detection(self, image):
        raise AssertionError("an already aligned image was aligned again")

    monkeypatch.setattr(FaceDetector, "detect", no_detection)
    cfg = build_config(
        None,
        data=str(tmp_path / "aligned"),
        out=str(tmp_path / "run"),
        backbone="resnet18",
        pretrained=False,
        image_size=48,
        epochs=1,
        batch_size=8,
        freeze_stem=False,
    )
    train(cfg, log=lambda s: None, progress=False)
    metrics = evaluate_model(
        str(tmp_path / "run" / "best_model.pth"), str(tmp_path / "aligned" / "test"), log=lambda s: None, progress=False
    )
    assert metrics["n"] == 4
    predictor = Predictor.from_file(tmp_path / "run" / "best_model.pth", device="cpu")
    assert predictor.detector is not None
    # aligned at the prepared crop size, then resized to the model's input, as in training
    assert predictor.face_config.size == 64 and predictor.prep.image_size == 48
    assert predictor.face_config.margin == pytest.approx(0.0)
    # the part of the crop the training faces filled is recorded and applied at prediction
    from facegender.core.preprocessing import visible_region
    from facegender.data.dataset import scan_dataset, split_train_val

    train_paths = split_train_val(scan_dataset(tmp_path / "aligned")[1], cfg.val_fraction, cfg.seed)[0].paths
    expected = visible_region(
        [predictor.prep.resize(Image.open(p).convert("RGB")) for p in train_paths], predictor.prep.pad_color
    )
    assert predictor.prep.visible == expected


def test_prepare_refuses_its_own_output_and_out_inside_data(tmp_path):
    raw = make_dataset(tmp_path / "raw", n_train=2, n_test=1)
    with pytest.raises(ValueError, match="must not be inside"):
        _prepare(raw, raw / "aligned")
    _prepare(raw, tmp_path / "out")
    with pytest.raises(ValueError, match="already the output"):
        _prepare(tmp_path / "out", tmp_path / "again")


def test_cli_import_csv_and_utkface(tmp_path, capsys):
    from facegender.app.cli import main

    rng = np.random.default_rng(0)
    rows = ["path,label,region"]
    for i in range(6):
        for c, label in enumerate(("laki-laki", "perempuan")):
            make_image(tmp_path / "imgs" / f"{label}_{i}.jpg", c, rng)
            rows.append(f"imgs/{label}_{i}.jpg,{label},r{i % 2}")
    rows.append("imgs/missing.jpg,perempuan,r0")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "dataset"
    assert main(["import", "csv", str(tmp_path / "labels.csv"), str(out), "--test-fraction", "0.5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "imported 12 images" in printed and "missing.jpg" in printed
    for split in ("train", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == ["laki-laki", "perempuan"]
        assert len(list((out / split / "perempuan").iterdir())) == 3
    assert main(["import", "csv", str(tmp_path / "labels.csv"), str(out)]) == 3  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err

    for i, (age, gender) in enumerate([(25, 0), (31, 0), (40, 1), (52, 1)]):
        make_image(tmp_path / "utk" / f"{age}_{gender}_{i % 5}_2017010{i}.jpg.chip.jpg", gender, rng)
    assert (
        main(
            [
                "import",
                "utkface",
                str(tmp_path / "utk"),
                str(tmp_path / "utkdata"),
                "--test-fraction",
                "0.5",
                "--link",
                "hardlink",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "utkdata" / "train").iterdir()) == ["female", "male"]
    assert (tmp_path / "utkdata" / "groups.csv").is_file()
