"""Prediction on ordinary photos: the face stage recorded at training time drives detection at
predict time; every face gets a box, landmarks, label and probability; no face is a status, not an
exception; annotated copies keep the photo's size."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from conftest import make_dataset, make_image, shared_path
from PIL import Image


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory):
    """A tiny random-weight model trained with align=True on synthetic images (which have no faces,
    so training falls back to centred crops); the aligned-crop cache goes to a temporary folder."""
    from facegender.training.config import build_config
    from facegender.training.train import train

    root = tmp_path_factory.mktemp("aligned")
    data = make_dataset(root / "data", n_train=6, n_test=2)
    cfg = build_config(
        None,
        data=str(data),
        out=str(root / "out"),
        backbone="resnet18",
        pretrained=False,
        image_size=64,
        epochs=1,
        batch_size=8,
        align=True,
        freeze_stem=False,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        train(cfg, log=lambda s: None, progress=False)
    return root / "out" / "best_model.pth"


@pytest.fixture(scope="module")
def predictor(aligned_model):
    from facegender.app.predict import Predictor

    return Predictor.from_file(aligned_model, device="cpu")


def test_align_training_records_face_stage_and_predictor_detects(aligned_model, predictor):
    from facegender.training.checkpoint import load_model

    _, record = load_model(aligned_model)
    face = record["preprocessing"]["face"]
    assert face is not None and face["size"] == 64 and face["margin"] == pytest.approx(0.0)
    assert record["config"]["align"] is True
    assert predictor.detector is not None
    assert predictor.face_config.size == 64


def test_refine_steps_can_be_lowered_at_prediction_for_speed(aligned_model, predictor, monkeypatch):
    from facegender.app.predict import Predictor
    from facegender.core.faces.detect import FaceDetector

    fast = Predictor.from_file(aligned_model, device="cpu", refine_steps=0)
    assert fast.face_config.refine_steps == 0 and fast.detector.config.refine_steps == 0
    assert predictor.face_config.refine_steps == 2  # as trained
    runs = []
    real = FaceDetector.run_network_batch
    monkeypatch.setattr(FaceDetector, "run_network_batch", lambda self, b: runs.append(len(b)) or real(self, b))
    photo = shared_path("images", "astronaut_female.png")
    [result] = fast.predict_paths([photo])
    assert len(result.faces) == 1 and runs == [1]  # one detection run, no refinement patches
    runs.clear()
    [result] = predictor.predict_paths([photo])
    assert len(result.faces) == 1 and runs == [1, 2, 2]  # then 2 rounds of (patch, mirror)


def test_no_face_is_a_status_not_an_exception(predictor, tmp_path):
    from facegender.app.predict import NO_FACE, format_result

    path = make_image(tmp_path / "stripes.png", 0, np.random.default_rng(1), size=96)
    [result] = predictor.predict_paths([path])
    assert result.status == NO_FACE and result.faces == []
    assert result.error is None and "error" not in result.to_dict()
    assert NO_FACE in format_result(result)


def test_group_photo_every_face_with_box_and_landmarks(predictor):
    photo = shared_path("images", "group_6_faces.jpg")
    [result] = predictor.predict_paths([photo])
    faces = result.faces
    assert result.status == "ok" and len(faces) == 6
    width, height = result.width, result.height
    for f in faces:
        x1, y1, x2, y2 = f.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert len(f.landmarks) == 5
        # eyes inside the box, left eye left of the right eye
        (lx, ly), (rx, ry) = f.landmarks[:2]
        assert x1 <= lx < rx <= x2 and y1 <= ly <= y2
        assert f.label in predictor.classes and 0.5 <= f.probability <= 1.0
        assert sum(f.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    # six different faces: box centres pairwise apart
    centres = np.array([[(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2] for f in faces])
    dists = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(6) * 1e9
    assert dists.min() > 10


def test_batching_across_faces_and_images_gives_the_same_result(aligned_model, tmp_path):
    """6 faces of one photo plus a second photo, in batches of 4, equal one batch of everything."""
    from facegender.app.predict import Predictor

    photo = shared_path("images", "group_6_faces.jpg")
    astronaut = shared_path("images", "astronaut_female.png")
    small = Predictor.from_file(aligned_model, device="cpu", batch_size=4)
    calls = []
    inner = small.logits_fn
    small.logits_fn = lambda batch: calls.append(len(batch)) or inner(batch)
    big = Predictor.from_file(aligned_model, device="cpu", batch_size=64)
    a, b = small.predict_paths([photo, astronaut]), big.predict_paths([photo, astronaut])
    assert [len(r.faces) for r in a] == [6, 1]
    n_tta = 2 if small.tta else 1
    assert max(calls) <= 4 and sum(calls) == 7 * n_tta
    for ra, rb in zip(a, b):
        for fa, fb in zip(ra.faces, rb.faces):
            assert fa.box == fb.box
            assert fa.probability == pytest.approx(fb.probability, abs=1e-4)


def test_no_detect_treats_each_image_as_one_face(aligned_model):
    from facegender.app.predict import Predictor

    photo = shared_path("images", "group_6_faces.jpg")
    p = Predictor.from_file(aligned_model, device="cpu", detect=False)
    assert p.detector is None
    [result] = p.predict_paths([photo])
    assert len(result.faces) == 1
    face = result.faces[0]
    assert face.landmarks is None and face.box == (0.0, 0.0, result.width, result.height) and face.is_whole_image


def test_cli_annotate_json_and_csv(aligned_model, tmp_path, capsys):
    from facegender.app.cli import main

    photo = shared_path("images", "group_6_faces.jpg")
    blank = make_image(tmp_path / "in" / "blank.jpg", 1, np.random.default_rng(2), size=80)
    out = tmp_path / "annotated"
    assert (
        main(
            ["predict", "--model", str(aligned_model), str(photo), str(blank.parent), "--annotate", str(out), "--json"]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in results] == ["ok", "no face found"]
    for face in results[0]["faces"]:
        assert {"box", "landmarks", "label", "probability"} <= set(face)
    drawn = sorted(out.iterdir())
    assert [p.name for p in drawn] == ["blank.jpg", "group_6_faces.jpg"]
    with Image.open(photo) as original, Image.open(out / "group_6_faces.jpg") as annotated:
        assert annotated.size == original.size
        # something was drawn: the copy differs from the photo
        diff = np.abs(np.asarray(annotated, dtype=np.int16) - np.asarray(original.convert("RGB"), dtype=np.int16))
        assert (diff.max(axis=-1) > 60).mean() > 0.001
    with Image.open(out / "blank.jpg") as annotated:
        assert annotated.size == (80, 80)

    assert main(["predict", "--model", str(aligned_model), str(photo), str(blank), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7
    assert rows[-1]["status"] == "no face found" and rows[-1]["label"] == ""
    assert all(r["status"] == "ok" and r["x2"] for r in rows[:6])
