"""Typed prediction results (`core.results`): `Model.predict` gives `PhotoResult`s with `Face`s;
`to_dict()` is exactly what `predict --json`/`--jsonl` and the HTTP API write, and `from_dict()`
reads it back. The models are the tiny ONNX colour classifiers of test_light.py (one with the face
stage, so that a photo can have no face)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
from PIL import Image
from test_light import SAMPLE, colour_model

FACE_KEYS = [
    "box",
    "landmarks",
    "detection_score",
    "label",
    "predicted_class",
    "probability",
    "probabilities",
    "uncertain",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(face-stage model, [the sample photo, a photo without a face, a file that is not an image])."""
    root = tmp_path_factory.mktemp("results")
    model = colour_model(
        root / "faces.onnx", size=32, face={"size": 32, "template": "dlib", "pad_color": [0, 0, 0], "refine_steps": 1}
    )
    blank = root / "blank.png"
    Image.new("RGB", (64, 48), (120, 120, 120)).save(blank)
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image")
    return model, [str(SAMPLE), str(blank), str(broken)]


@pytest.fixture(scope="module")
def results(photos):
    import facegender

    model, inputs = photos
    return facegender.load(model, threads=1).predict(inputs)


def test_predict_gives_typed_results(results):
    from facegender import Face, PhotoResult

    assert all(isinstance(r, PhotoResult) for r in results)
    face_photo, blank, broken = results
    assert [r.status for r in results] == ["ok", "no face found", "error"]
    assert len(face_photo.faces) == 1 and isinstance(face_photo.faces[0], Face)


def test_every_consumer_visible_field_is_an_attribute(results):
    from facegender.core.results import face_numbers

    photo = results[0]
    assert (photo.file, photo.width, photo.height, photo.error, photo.failed) == (str(SAMPLE), 512, 512, None, False)
    (face,) = photo.faces
    x1, y1, x2, y2 = face.box
    assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 200  # the astronaut's face
    assert len(face.landmarks) == 5 and all(len(point) == 2 for point in face.landmarks)
    assert 0 < face.detection_score <= 1 and not face.is_whole_image
    assert face.label == face.predicted_class in ("blue", "red")
    assert set(face.probabilities) == {"blue", "red"} and face.probability == max(face.probabilities.values())
    assert sum(face.probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert isinstance(face.uncertain, bool)
    assert face_numbers(photo.faces) == [1] and photo.numbered_faces() == [(1, face)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        face.label = "red"


def test_no_face_and_unreadable_file(results):
    _, blank, broken = results
    assert blank.faces == [] and blank.error is None and not blank.failed and (blank.width, blank.height) == (64, 48)
    assert blank.to_dict() == {"file": blank.file, "width": 64, "height": 48, "faces": [], "status": "no face found"}
    assert broken.failed and broken.faces == [] and broken.width is None
    assert broken.status == "error" and "broken.jpg" in broken.error and "not a readable image" in broken.error
    assert list(broken.to_dict()) == ["file", "error", "status", "faces"]
    assert broken.to_dict() == {"file": broken.file, "error": broken.error, "status": "error", "faces": []}


def test_to_dict_keys_in_order_and_round_trips(results):
    from facegender.core.results import PhotoResult

    photo = results[0]
    data = photo.to_dict()
    assert list(data) == ["file", "width", "height", "faces", "status"]
    assert list(data["faces"][0]) == FACE_KEYS
    assert isinstance(data["faces"][0]["box"], list) and isinstance(data["faces"][0]["landmarks"][0], list)
    for r in results:
        assert PhotoResult.from_dict(r.to_dict()) == r
        assert PhotoResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r  # through JSON text
        assert PhotoResult.from_dict(r.to_dict()).to_dict() == r.to_dict()


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_to_dict_is_what_the_json_output_writes(photos, results, fmt, capsys):
    from facegender.app.cli import main

    model, inputs = photos
    assert main(["predict", "--model", str(model), f"--{fmt}", "--quiet", *inputs]) == 1  # the broken file
    out = capsys.readouterr().out
    dicts = [r.to_dict() for r in results]
    if fmt == "jsonl":
        assert out == "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dicts)
    else:
        assert out == json.dumps(dicts, indent=2, ensure_ascii=False) + "\n"


def test_the_writer_takes_results_or_their_dicts_alike(results):
    from facegender.app.output import FORMATS, ResultWriter

    for fmt in FORMATS:
        written = []
        for items in (results, [r.to_dict() for r in results]):
            stream = io.StringIO()
            writer = ResultWriter(fmt, stream)
            for r in items:
                writer.write(r)
            writer.close()
            written.append(stream.getvalue())
        assert written[0] == written[1], fmt
    assert ResultWriter("text", io.StringIO()).record(results[1]).endswith(": no face found\n")


def test_the_http_answer_is_to_dict_with_the_index(tmp_path):
    from fastapi.testclient import TestClient

    import facegender
    from facegender.app.serve import create_app

    model = colour_model(tmp_path / "colour.onnx")
    red, blue = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (30, 20), (200, 30, 40)).save(red, format="PNG")
    Image.new("RGB", (20, 30), (20, 40, 210)).save(blue, format="PNG")
    uploads = [("red.png", red.getvalue()), ("junk.png", b"junk"), ("blue.png", blue.getvalue())]
    with TestClient(create_app(model, threads=1)) as client:
        reply = client.post("/predict", files=[("files", (name, data, "image/png")) for name, data in uploads])
    assert reply.status_code == 200, reply.text
    expected = facegender.load(model, threads=1).predict_sources(uploads)
    assert reply.json()["results"] == [{**r.to_dict(), "index": i} for i, r in enumerate(expected)]
    assert [r.faces[0].label if r.faces else None for r in expected] == ["red", None, "blue"]
    assert expected[0].faces[0].is_whole_image and expected[0].faces[0].box == (0.0, 0.0, 30.0, 20.0)
