"""Annotated images: labels always inside the image, faces numbered left to right; `predict`'s text
output for a model that does not detect faces; the `detects_faces` flag of GET /model; the shipped
sample photo. None of these needs ../shared."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from test_serve import CLASSES, save_random_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def face(box, label="wanita", probability=0.91, landmarks=True):
    from facegender.core.results import Face

    x1, y1, x2, y2 = box
    marks = (
        tuple(
            (x1 + (x2 - x1) * a, y1 + (y2 - y1) * b)
            for a, b in ((0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8))
        )
        if landmarks
        else None
    )
    other = 1 - probability
    return Face(
        box=tuple(box),
        landmarks=marks,
        detection_score=0.99 if landmarks else None,
        label=label,
        predicted_class=label,
        probability=probability,
        probabilities={label: probability, "x": other},
    )


def inside(rect, size):
    left, top, right, bottom = rect
    return 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


# ----------------------------------------------------------------------------- label placement


@pytest.mark.parametrize(
    "box",
    [
        (150, 0, 200, 60),  # top and right edges
        (0, 0, 40, 40),  # top-left corner
        (170, 150, 200, 200),  # bottom-right corner
        (0, 0, 200, 200),  # the whole image
        (190, 10, 260, 90),  # partly outside the image
    ],
)
def test_place_label_keeps_the_label_inside(box):
    from facegender.app.annotate import place_label

    for size in ((60, 16), (250, 30), (20, 300)):
        rect = place_label(size, box, (200, 200))
        assert inside(rect, (200, 200)), (box, size, rect)


def test_place_label_above_else_below_else_inside():
    from facegender.app.annotate import place_label

    assert place_label((50, 14), (20, 60, 80, 120), (200, 200)) == (20, 46, 70, 60)  # above
    assert place_label((50, 14), (20, 0, 80, 60), (200, 200)) == (20, 60, 70, 74)  # below
    assert place_label((50, 14), (0, 0, 200, 200), (200, 200)) == (0, 0, 50, 14)  # inside, at the top
    assert place_label((50, 14), (170, 0, 200, 60), (200, 200)) == (150, 60, 200, 74)  # shifted left


def test_annotated_label_at_top_right_edges_is_drawn_inside_the_image():
    """A face box touching the top and right edges: the label rectangle (from the layout) lies in
    the image, and its pixels really are the class colour."""
    from facegender.app.annotate import PALETTE, draw_faces, label_layout

    image = Image.new("RGB", (240, 180), (128, 128, 128))
    faces = [face((170, 0, 240, 70), label="wanita")]
    [spot] = label_layout(image.size, faces)
    assert inside(spot["rect"], image.size)
    left, top, right, bottom = spot["rect"]
    assert right == 240 or right - left == 240  # pushed against the right edge
    assert top >= 70  # below the box: no room above it

    drawn = np.asarray(draw_faces(image, faces, CLASSES))
    patch = drawn[top:bottom, left:right].reshape(-1, 3).astype(int)
    colour = np.array(PALETTE[CLASSES.index("wanita")])
    assert (np.abs(patch - colour).max(axis=1) <= 2).mean() > 0.5  # the label's fill (the rest is text)
    white = (patch.min(axis=1) > 200).mean()
    assert white > 0.02  # and its text


def test_whole_image_box_gets_its_label_inside_without_a_number():
    from facegender.app.annotate import draw_faces, label_layout

    image = Image.new("RGB", (120, 90), (20, 20, 20))
    faces = [face((0, 0, 120, 90), label="pria", landmarks=False)]
    [spot] = label_layout(image.size, faces)
    assert spot["number"] is None and spot["text"] == "pria 0.91"
    assert inside(spot["rect"], image.size) and spot["rect"][1] == 0
    drawn = np.asarray(draw_faces(image, faces, CLASSES))
    left, top, right, bottom = spot["rect"]
    assert (drawn[top:bottom, left:right] > 60).any(axis=-1).mean() > 0.5  # drawn, not off the canvas


def test_long_label_on_a_small_image_shrinks_to_fit():
    from facegender.app.annotate import label_layout

    faces = [face((2, 2, 30, 30), label="a-rather-long-class-name", probability=0.5)]
    [spot] = label_layout((64, 64), faces)
    assert inside(spot["rect"], (64, 64))


# ----------------------------------------------------------------------------- numbering


def test_faces_are_numbered_left_to_right():
    from facegender.app.annotate import face_numbers, label_layout

    faces = [face((300, 50, 380, 130)), face((20, 80, 90, 150)), face((150, 10, 220, 90))]
    assert face_numbers(faces) == [3, 1, 2]
    texts = [spot["text"] for spot in label_layout((400, 300), faces)]
    assert texts == ["3: wanita 0.91", "1: wanita 0.91", "2: wanita 0.91"]
    for spot in label_layout((400, 300), faces):
        assert inside(spot["rect"], (400, 300))
    # ties on x: top to bottom, then list order
    assert face_numbers([face((10, 90, 50, 130)), face((10, 5, 50, 45)), face((10, 5, 50, 45))]) == [3, 1, 2]
    assert face_numbers([]) == []


def test_predict_text_numbers_faces_left_to_right():
    from facegender.app.predict import format_result
    from facegender.core.results import PhotoResult

    result = PhotoResult(
        "group.jpg",
        width=400,
        height=300,
        faces=[
            face((300, 50, 380, 130), "pria", 0.8),
            face((20, 80, 90, 150), "wanita", 0.7),
            face((150, 10, 220, 90), "pria", 0.95),
        ],
    )
    lines = format_result(result).splitlines()
    assert lines == [
        "group.jpg: face 1 at (20, 80, 90, 150) wanita 0.700",
        "group.jpg: face 2 at (150, 10, 220, 90) pria 0.950",
        "group.jpg: face 3 at (300, 50, 380, 130) pria 0.800",
    ]


def test_annotate_results_writes_numbered_labels_inside(tmp_path):
    from facegender.app.annotate import annotate_results
    from facegender.core.results import PhotoResult

    photo = tmp_path / "photo.png"
    Image.new("RGB", (200, 120), (90, 90, 90)).save(photo)
    results = [
        PhotoResult(
            str(photo), width=200, height=120, faces=[face((140, 0, 200, 60), "pria"), face((0, 0, 60, 60), "wanita")]
        ),
        PhotoResult(str(tmp_path / "gone.png"), error="gone.png: file not found"),
    ]
    [written] = annotate_results(results, tmp_path / "out", CLASSES)
    assert results[0].annotated == str(written) and results[1].annotated is None
    assert results[0].to_dict()["annotated"] == str(written) and "annotated" not in results[1].to_dict()
    with Image.open(written) as im:
        assert im.size == (200, 120)


# ----------------------------------------------------------------------------- models without a face stage


def test_predict_says_whole_image_for_a_model_without_a_face_stage(tmp_path):
    from facegender.app.predict import WHOLE_IMAGE, Predictor, format_result
    from facegender.core.resources import sample_photo_path

    model = save_random_model(tmp_path / "best_model.pth", align=False)
    predictor = Predictor.from_file(model, device="cpu")
    assert predictor.detector is None
    results = predictor.predict_paths([sample_photo_path(), sample_photo_path()])
    for result in results:
        text = format_result(result)
        assert WHOLE_IMAGE == "whole image (this model does not detect faces)"
        assert text.startswith(f"{sample_photo_path()}: {WHOLE_IMAGE} ")
        assert text.split()[-2] in CLASSES


def test_model_endpoint_says_whether_the_model_detects_faces(tmp_path):
    from fastapi.testclient import TestClient

    from facegender.app.serve import create_app

    model = save_random_model(tmp_path / "best_model.pth", align=False)
    with TestClient(create_app(model, device="cpu")) as client:
        info = client.get("/model").json()
        assert info["detects_faces"] is False
        assert "this model does not detect faces" in client.get("/").text  # the page knows the wording


def test_model_summary_flags_a_face_detecting_model():
    from facegender.app.serve import ServeLimits, model_summary
    from facegender.core.preprocessing import Preprocessing

    class Stub:
        info = {"backbone": "resnet18"}
        classes = CLASSES
        prep = Preprocessing(64, (0.5,) * 3, (0.5,) * 3, face=None)
        temperature, tta = 1.0, False

    stub = Stub()
    stub.detector = object()
    assert model_summary(stub, "m.pth", ServeLimits())["detects_faces"] is True
    stub.detector = None
    assert model_summary(stub, "m.pth", ServeLimits())["detects_faces"] is False


# ----------------------------------------------------------------------------- the sample photo


def test_sample_photo_ships_with_the_package():
    from facegender.core.resources import sample_photo_path

    path = sample_photo_path()
    assert path.name == "astronaut.jpg" and path.parent.name == "samples"
    assert path.stat().st_size < 80_000
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (512, 512) and im.mode == "RGB"
    assert (path.parent / "README.md").read_text().lower().count("public domain") >= 1
    assert '"core/samples/*"' in (REPO / "pyproject.toml").read_text()  # package-data: in the wheel too


def test_sample_photo_is_tracked_by_git():
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "src/facegender/core/samples"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert {"src/facegender/core/samples/astronaut.jpg", "src/facegender/core/samples/README.md"} <= set(tracked)
