"""Files that ship inside the package, by path: the sample photo (and, later, the bundled model).

They live beside this module (`pyproject.toml` lists them in `package-data`), so they are there in
an installed package as well as in a source checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = PACKAGE_DIR / "samples"

#: A public-domain portrait (NASA, Eileen Collins; scikit-image's `astronaut`), 512x512 JPEG.
SAMPLE_PHOTO = "astronaut.jpg"


def sample_photo_path() -> Path:
    """The path of the shipped sample photo (see samples/README.md for its source and licence)."""
    path = SAMPLES_DIR / SAMPLE_PHOTO
    if not path.is_file():
        raise FileNotFoundError(f"the sample photo {path} is missing from this installation of facegender; "
                                "reinstall it (pip install --force-reinstall facegender)")
    return path
