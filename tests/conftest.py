"""Shared fixtures: small synthetic datasets the tests make themselves, and the optional ../shared data."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Two threads is all this project's machines have; more only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data sits beside the repository in development and CI")
    return path


def make_image(path: Path, cls: int, rng: np.random.Generator, size: int = 48) -> Path:
    """A learnable synthetic picture: class 0 has horizontal stripes and is reddish,
    class 1 vertical stripes and bluish; with noise so no two are equal."""
    y, x = np.mgrid[0:size, 0:size]
    stripes = ((y if cls == 0 else x) // 6) % 2
    img = np.zeros((size, size, 3), dtype=np.float32)
    img[..., 0 if cls == 0 else 2] = 150 + 80 * stripes
    img[..., 1] = 90
    img += rng.normal(0, 20, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def make_dataset(root: Path, classes=("pria", "wanita"), n_train: int = 12, n_test: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            for i in range(n):
                make_image(root / split / name / f"{name}_{i:03d}.jpg", c, rng)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small model trained once per test session (random weights: fast and offline)."""
    from facegender.training.config import build_config
    from facegender.training.train import train

    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "data", n_train=16, n_test=8)
    cfg = build_config(
        None,
        data=str(data),
        out=str(root / "out"),
        backbone="resnet18",
        pretrained=False,
        image_size=64,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        freeze_stem=False,
    )
    train(cfg, log=lambda s: None, progress=False)
    return root


#: Prepended to a child program: torch and torchvision cannot be imported (as after `pip install
#: facegender` without the `train` extra).
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this test runs as if PyTorch were "
                                      "not installed)", name=name)
sys.meta_path.insert(0, _NoTorch())
"""
CHECK_NO_TORCH = """
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")], "torch was imported"
print("NO-TORCH-OK")
"""


def run_without_torch(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter without PyTorch; its stdout. Fails the test when the
    program fails or imported torch."""
    program = BLOCK_TORCH + textwrap.dedent(code) + CHECK_NO_TORCH
    proc = subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "NO-TORCH-OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout
