"""The Makefile's first-hour targets (run with `make -n` where they would install or run anything)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_train_without_a_dataset_says_what_to_do_next(tmp_path):
    venv = tmp_path / "venv"
    run = make("train", f"DATA={tmp_path / 'missing'}", f"VENV={venv}")
    assert run.returncode != 0
    out = run.stdout
    assert f"no dataset at '{tmp_path / 'missing'}'" in out
    assert "DATA/train/<class>/" in out and "DATA/test/<class>/" in out
    assert "facegender import utkface" in out and "facegender import csv" in out
    for name in ("UTKFace", "FairFace", "Adience", "CelebA"):
        assert name in out
    assert "http" not in out
    assert not venv.exists()  # nothing was installed first


def test_train_with_a_dataset_trains_and_evaluates(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    run = make("-n", "train", f"DATA={tmp_path / 'd'}", "ARGS=--epochs 1")
    assert run.returncode == 0, run.stderr
    assert f".venv/bin/facegender train --data {tmp_path / 'd'} --out output --epochs 1" in run.stdout
    assert f"--data {tmp_path / 'd'}/test" in run.stdout


def test_predict_and_serve_targets():
    run = make("-n", "predict", "FILES=a.jpg b.png")
    assert run.returncode == 0 and ".venv/bin/facegender predict" in run.stdout and "a.jpg b.png" in run.stdout
    run = make("-n", "predict")
    assert run.returncode == 0 and ".venv/bin/facegender predict --sample" in run.stdout
    run = make("-n", "predict", "MODEL=m.pth", "FILES=x.jpg")
    assert "predict --model m.pth x.jpg" in run.stdout
    run = make("-n", "serve")
    assert run.returncode == 0 and ".venv/bin/facegender serve" in run.stdout
    run = make("-n", "default-model")
    assert run.returncode == 0 and "--preset best --out runs/default-model" in run.stdout
    assert "python -m tools.build_default_model runs/default-model/best_model.pth --shared ../shared" in run.stdout
    run = make("-n", "test")
    assert run.returncode == 0 and ".venv/bin/python -m pytest -q" in run.stdout
    steps = run.stdout.splitlines()
    lint = [
        i for i, line in enumerate(steps) if line.endswith(("ruff check .", "ruff format --check .", "lint-imports"))
    ]
    assert len(lint) == 3 and max(lint) < steps.index(".venv/bin/python -m pytest -q")  # lint fails before the suite
