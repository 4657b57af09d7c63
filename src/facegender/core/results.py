"""What a prediction returns: a `PhotoResult` per photo, with a `Face` per face found.

`Model.predict` / `predict_iter` / `predict_sources` / `predict_paths` give `PhotoResult`s
(`predict_images`: lists of `Face`). Every command reads their attributes; `to_dict()` is the one
serialised form, written at the output boundary (`predict --json`/`--jsonl`/`--csv`, the HTTP API):

    {"file", "width", "height", "faces": [face, ...], "status"}      a photo that was read
    {"file", "error", "status": "error", "faces": []}                a file that could not be read
    face: {"box", "landmarks", "detection_score", "label", "predicted_class", "probability",
           "probabilities", "uncertain"}

`status` is "ok" (faces found), `NO_FACE` ("no face found") or "error". `from_dict()` reads such a
dict back (a record of a JSON file, a Ray worker's JSON). Faces are numbered left to right
(`face_numbers`), as on annotated images, in the text output and on the web page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: The `status` of a photo in which faces were found.
OK = "ok"
#: The `status` (and the text output) of a photo without a face.
NO_FACE = "no face found"
#: The `status` of a file that could not be read (its reason is `error`).
ERROR = "error"
#: The `label` of a face whose probability is below `min_confidence` (`predicted_class` keeps the class).
UNCERTAIN = "uncertain"

__all__ = ["Face", "PhotoResult", "face_numbers", "OK", "NO_FACE", "ERROR", "UNCERTAIN"]


@dataclass(frozen=True, slots=True)
class Face:
    """One face of a photo, in the photo's (EXIF-upright) pixel coordinates.

    `box`: (x1, y1, x2, y2); `landmarks`: five (x, y) points, None when no detector looked (the
    whole image, `is_whole_image`); `detection_score`: the detector's, or None; `label`: the
    decided class, or `UNCERTAIN` below `min_confidence`; `predicted_class`: the decided class
    always; `probability`: the calibrated probability of `predicted_class`; `probabilities`: every
    class's; `uncertain`: the probability is within `uncertain_band` of the threshold."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...] | None
    detection_score: float | None
    label: str
    predicted_class: str
    probability: float
    probabilities: dict[str, float]
    uncertain: bool = False

    @property
    def is_whole_image(self) -> bool:
        """True for a "face" that is the whole image: no detector looked for faces (a model without a
        face stage, or `--no-detect`), so there are no landmarks and no detection score."""
        return self.landmarks is None and self.detection_score is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "landmarks": None if self.landmarks is None else [list(point) for point in self.landmarks],
            "detection_score": self.detection_score,
            "label": self.label,
            "predicted_class": self.predicted_class,
            "probability": self.probability,
            "probabilities": dict(self.probabilities),
            "uncertain": self.uncertain,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Face:
        landmarks = data.get("landmarks")
        return cls(
            box=tuple(data["box"]),
            landmarks=None if landmarks is None else tuple(map(tuple, landmarks)),
            detection_score=data.get("detection_score"),
            label=data["label"],
            predicted_class=data.get("predicted_class", data["label"]),
            probability=data["probability"],
            probabilities=dict(data["probabilities"]),
            uncertain=bool(data.get("uncertain", False)),
        )


def face_numbers(faces: Sequence[Face]) -> list[int]:
    """The number (1, 2, 3...) of each face, left to right by the left edge of its box (then top
    to bottom, then list order); `numbers[i]` belongs to `faces[i]`. The web page numbers the same way."""
    order = sorted(range(len(faces)), key=lambda i: (faces[i].box[0], faces[i].box[1], i))
    numbers = [0] * len(faces)
    for number, i in enumerate(order, start=1):
        numbers[i] = number
    return numbers


@dataclass(slots=True)
class PhotoResult:
    """One photo's prediction: its `file` (the name it was given), size, faces (largest first),
    or the `error` that kept it from being read. `annotated`: the path of its annotated copy, once
    `annotate.annotate_results` has written one (in `to_dict()` only when set)."""

    file: str
    faces: list[Face] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    annotated: str | None = None

    @property
    def status(self) -> str:
        """ "ok", `NO_FACE` or "error"."""
        return ERROR if self.error is not None else OK if self.faces else NO_FACE

    @property
    def failed(self) -> bool:
        """True for a file that could not be read."""
        return self.error is not None

    def numbered_faces(self) -> list[tuple[int, Face]]:
        """(number, face) for each face, left to right (`face_numbers`)."""
        return sorted(zip(face_numbers(self.faces), self.faces), key=lambda item: item[0])

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON data: the keys, order and values of the module docstring."""
        faces = [f.to_dict() for f in self.faces]
        if self.error is not None:
            data = {"file": self.file, "error": self.error, "status": self.status, "faces": faces}
        else:
            data = {
                "file": self.file,
                "width": self.width,
                "height": self.height,
                "faces": faces,
                "status": self.status,
            }
        if self.annotated is not None:
            data["annotated"] = self.annotated
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhotoResult:
        """A result from its `to_dict()` form (`status` follows from `error` and `faces`)."""
        return cls(
            file=data["file"],
            faces=[Face.from_dict(f) for f in data.get("faces") or []],
            width=data.get("width"),
            height=data.get("height"),
            error=data.get("error"),
            annotated=data.get("annotated"),
        )
