"""Files that ship inside the package, by path: the sample photo and the bundled default model
(tools/build_default_model.py says what that model is and rebuilds it).

They ship as package data of `facegender.core` (`pyproject.toml` lists them in `package-data`) and
are found through `importlib.resources`, so they are there in an installed package as well as in a
source checkout. They are handed out as paths (onnxruntime and Pillow open files by name): the
package must be installed as files, as pip does, not run from a zip archive.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from facegender.core.errors import ModelFileNotFoundError


def package_path(*parts: str) -> Path:
    """The path of a file or folder of facegender.core's package data (`parts` below the package:
    "samples", "faces/retinaface.onnx"...), found with `importlib.resources`. It does not exist when
    the package is not on disk, and the callers then say that the installation lacks it."""
    return Path(str(importlib.resources.files("facegender.core").joinpath(*parts)))


SAMPLES_DIR = package_path("samples")
DEFAULT_DIR = package_path("default_model")
MODEL_FILE = "gender.onnx"
RECORD_FILE = "gender.json"

#: A public-domain portrait (NASA, Eileen Collins; scikit-image's `astronaut`), 512x512 JPEG.
SAMPLE_PHOTO = "astronaut.jpg"


def _shipped(path: Path, what: str, fix: str = "") -> Path:
    """`path` of a file that ships with facegender, or a clear error when the installation lacks it."""
    if not path.is_file():
        raise ModelFileNotFoundError(
            f"{what} {path} is missing from this installation of facegender; "
            f"reinstall it (pip install --force-reinstall facegender){fix}"
        )
    return path


def sample_photo_path() -> Path:
    """The path of the shipped sample photo (see samples/README.md for its source and licence)."""
    return _shipped(SAMPLES_DIR / SAMPLE_PHOTO, "the sample photo")


def default_model_path() -> Path:
    """The bundled default model, which `facegender.load()` and the commands use without a path."""
    return _shipped(
        DEFAULT_DIR / MODEL_FILE,
        "the bundled default model",
        ", or pass --model with a model you trained (facegender train)",
    )


def default_model_record() -> dict:
    """The bundled model's record (gender.json: hash, classes, preprocessing, recipe, measured accuracy)."""
    import json

    return json.loads((DEFAULT_DIR / RECORD_FILE).read_text(encoding="utf-8"))


def cache_dir(*parts: str) -> Path:
    """facegender's cache folder (joined with `parts`): $FACEGENDER_CACHE, else
    $XDG_CACHE_HOME/facegender, else ~/.cache/facegender. Aligned faces, embeddings and the
    converted dlib weights live in subfolders of it."""
    if os.environ.get("FACEGENDER_CACHE"):
        base = Path(os.environ["FACEGENDER_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facegender"
    return base.joinpath(*parts)
