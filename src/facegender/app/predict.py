"""`facegender predict`: labels for new images, one result per face, printed for people.

The work is done by `core.model.Model` (`facegender.load`): a model trained on aligned faces
(`train --align` / `--preset best`) finds every face in a photo, aligns it as in training and
classifies all faces of a batch of images together; a model trained on plain crops classifies the
whole image as one face, as the course report did. `detect=False` (`--no-detect`) treats each
image as one already-cropped face either way. This module keeps the names it always had
(`Predictor` is `core.model.Model`) and formats a `core.results.PhotoResult` for people.
"""

from __future__ import annotations

from facegender.core.model import Model, expand_paths
from facegender.core.results import NO_FACE, UNCERTAIN, PhotoResult

#: The loaded model (`Predictor.from_file(path)` is `facegender.load(path)`).
Predictor = Model

__all__ = ["Predictor", "NO_FACE", "UNCERTAIN", "WHOLE_IMAGE", "expand_paths", "format_result"]

#: Printed in place of a face's box when no face was looked for (a model without a face stage).
WHOLE_IMAGE = "whole image (this model does not detect faces)"


def format_result(result: PhotoResult) -> str:
    """One line per face for people, faces numbered left to right as on annotated images."""
    if result.error:
        return f"{result.file}: ERROR {result.error}"
    if not result.faces:
        return f"{result.file}: {NO_FACE}"
    lines = []
    for number, f in result.numbered_faces():
        where = f" {WHOLE_IMAGE}" if f.is_whole_image else f" face {number} at ({', '.join(f'{v:.0f}' for v in f.box)})"
        note = f" (most likely {f.predicted_class})" if f.label == UNCERTAIN else ""
        lines.append(f"{result.file}:{where} {f.label}{note} {f.probability:.3f}")
    return "\n".join(lines)
