"""`facegender predict`: labels for new images, one result per face, printed for people.

The work is done by `inference.Model` (`facegender.load`): a model trained on aligned faces
(`train --align` / `--preset best`) finds every face in a photo, aligns it as in training and
classifies all faces of a batch of images together; a model trained on plain crops classifies the
whole image as one face, as the course report did. `detect=False` (`--no-detect`) treats each
image as one already-cropped face either way. This module keeps the names it always had
(`Predictor` is `inference.Model`) and formats results.
"""

from __future__ import annotations

from facegender.core.model import NO_FACE, UNCERTAIN, Model, expand_paths

#: The loaded model (`Predictor.from_file(path)` is `facegender.load(path)`).
Predictor = Model

__all__ = ["Predictor", "NO_FACE", "UNCERTAIN", "WHOLE_IMAGE", "expand_paths", "format_result"]

#: Printed in place of a face's box when no face was looked for (a model without a face stage).
WHOLE_IMAGE = "whole image (this model does not detect faces)"


def format_result(result: dict) -> str:
    """One line per face for people."""
    if result.get("error"):
        return f"{result['file']}: ERROR {result['error']}"
    if not result["faces"]:
        return f"{result['file']}: {NO_FACE}"
    from facegender.app.annotate import face_numbers, is_whole_image

    lines, numbers = [], face_numbers(result["faces"])  # left to right, as on annotated images
    for i, f in sorted(enumerate(result["faces"]), key=lambda item: numbers[item[0]]):
        where = f" {WHOLE_IMAGE}" if is_whole_image(f) else \
            f" face {numbers[i]} at ({', '.join(f'{v:.0f}' for v in f['box'])})"
        note = f" (most likely {f['predicted_class']})" if f["label"] == UNCERTAIN else ""
        lines.append(f"{result['file']}:{where} {f['label']}{note} {f['probability']:.3f}")
    return "\n".join(lines)
