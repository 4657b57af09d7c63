"""The layers of docs/architecture.md hold, and breaking one of them fails the check.

The contracts live in pyproject.toml ([tool.importlinter]); `make test` and CI run `lint-imports`
before pytest. These tests run it too, on the real tree and on copies with one bad import added.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (the dev extra)")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package (and pyproject.toml) where `module` (a path under src/facegender) also
    has `line` at its end."""
    root = tmp_path / "repo"
    shutil.copytree(
        REPO / "src" / "facegender",
        root / "src" / "facegender",
        ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.jpg"),
    )
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    target = root / "src" / "facegender" / module
    target.write_text(target.read_text() + f"\n\ndef _broken():\n    {line}\n")
    return root


def test_the_tree_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/images.py", "import torch", "import neither torch nor the training package"),
        (
            "evaluation/metrics.py",
            "from facegender.training import engine",
            "import neither torch nor the training package",
        ),
        ("app/serve.py", "import torchvision", "import neither torch nor the training package"),
        ("core/preprocessing.py", "from facegender.data import dataset", "Layers go one way"),
        ("data/sources.py", "from facegender.evaluation import metrics", "Layers go one way"),
        ("evaluation/plots.py", "from facegender.app import output", "Layers go one way"),
    ],
)
def test_breaking_a_contract_fails(tmp_path, module, line, contract):
    """An import inside a function counts too: that is where optional imports hide."""
    result = lint_imports(copy_with(tmp_path, module, line))
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.replace("/", ".").removesuffix(".py") in broken


def long_functions(folder: Path, limit: int) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_over_60_lines():
    assert long_functions(REPO / "src" / "facegender", 60) == []
