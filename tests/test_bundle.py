"""The bundled default model: the shipped file is the one its record describes, it labels the
sample photos as the record (and the model card) says, and the commands use it without --model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, shared_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("face_recognition_models") is None,
    reason="face_recognition_models (the bundled model's face backbone) is not installed",
)


@pytest.fixture(scope="module")
def record():
    from facegender.core.resources import default_model_record

    return default_model_record()


@pytest.fixture(scope="module")
def model():
    import facegender

    return facegender.load(device="cpu")  # no path: the bundled model


def test_shipped_file_matches_its_record(record):
    from facegender.core.files import sha256_file
    from facegender.core.model_card import is_head_only
    from facegender.core.onnx_model import load_onnx_classifier
    from facegender.core.resources import default_model_path
    from tools.build_default_model import MAX_BYTES

    path = default_model_path()
    assert path.suffix == ".onnx"  # runs on onnxruntime, without PyTorch
    assert sha256_file(path) == record["sha256"]
    assert path.stat().st_size == record["bytes"] < MAX_BYTES
    backend, stored = load_onnx_classifier(path, threads=1)
    assert stored["classes"] == record["classes"] == ["female", "male"]
    assert stored["preprocessing"] == record["preprocessing"]
    assert stored["backbone"] == record["backbone"] == "dlib_resnet"
    if is_head_only(record):
        assert stored["body"]["backbone"] == "dlib_resnet"  # head only: the face backbone comes from the package
        assert backend.body is not None
    else:  # the whole (fine-tuned) network is in the file
        assert not stored.get("body") and backend.body is None
        assert (stored.get("quantization") or "fp32") == record["quantization"]
    assert stored["temperature"] == pytest.approx(record["temperature"])
    assert stored["tta"] is record["tta"]
    files = subprocess.run(
        ["git", "ls-files", "src/facegender/core/default_model"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert sorted(files) == [
        "src/facegender/core/default_model/gender.json",
        "src/facegender/core/default_model/gender.onnx",
    ]


def test_model_card_gives_the_recorded_numbers(record):
    card = (REPO / "docs" / "model-card.md").read_text(encoding="utf-8")
    m = record["measured"]
    assert f"{100 * m['gdf_test']['accuracy']:.1f}%" in card
    assert f"{100 * m['faces_ood']['accuracy']:.1f}%" in card
    for cls, recall in m["faces_ood"]["recall"].items():
        assert f"{100 * recall:.1f}%" in card, cls
    assert record["sha256"][:12] in card


def test_labels_the_shipped_sample_photo_as_recorded(model, record):
    from facegender.core.resources import sample_photo_path

    (result,) = model.predict([sample_photo_path()])
    assert len(result.faces) == 1
    face = result.faces[0]
    expected = next(f for f in record["measured"]["samples"]["faces"] if f["photo"] == "astronaut_female.png")
    assert face.label == expected["label"] == "female"
    # the shipped JPEG is the recorded PNG re-encoded: the probability moves only a little
    assert face.probability == pytest.approx(expected["probability"], abs=0.02)


def test_labels_the_shared_group_photo_as_recorded(model, record):
    photo = shared_path("images", "group_6_faces.jpg")
    (result,) = model.predict([photo])
    faces = sorted(result.faces, key=lambda f: f.box[0])
    expected = [f for f in record["measured"]["samples"]["faces"] if f["photo"] == photo.name]
    assert [f.label for f in faces] == [f["label"] for f in expected]
    for got, want in zip(faces, expected):
        assert got.probability == pytest.approx(want["probability"], abs=1e-3)


def test_predict_without_model_says_it_uses_the_bundled_one_and_models_describes_it(record):
    run = [sys.executable, "-m", "facegender"]
    proc = subprocess.run([*run, "predict", "--sample"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "using the bundled default model" in proc.stderr
    assert "astronaut.jpg: face 1" in proc.stdout and "female" in proc.stdout
    proc = subprocess.run([*run, "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and record["sha256"] in proc.stdout and "dlib_resnet" in proc.stdout
    proc = subprocess.run([*run, "models", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout)["sha256"] == record["sha256"]
    proc = subprocess.run([*run, "predict"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "--sample" in proc.stderr


def test_a_missing_shipped_file_names_itself_and_the_fix(tmp_path, monkeypatch):
    from facegender.core import resources

    monkeypatch.setattr(resources, "DEFAULT_DIR", tmp_path)
    monkeypatch.setattr(resources, "SAMPLES_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gender\.onnx is missing .* reinstall .* or pass --model"):
        resources.default_model_path()
    with pytest.raises(FileNotFoundError, match=r"astronaut\.jpg is missing .* reinstall"):
        resources.sample_photo_path()
