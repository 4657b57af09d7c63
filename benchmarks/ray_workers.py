"""Photos per second of `predict_ray` (facegender predict --ray) with 1 and 2 model actors, beside the local
command on the same photos, for docs/scale.md.

    python benchmarks/ray_workers.py [--folder DIR] [--repeat K] [--workers 1 2] [--model M] [--full]

The photos are the 200 of ../shared/datasets/faces-dev/test (--folder: another folder), each listed
--repeat times (the work is real every time: prediction keeps no cache). One local Ray instance
(`ray.init(num_cpus=os.cpu_count())`) serves every run; each run starts its own actor pool, so its
wall time includes the actors' start and model loading (about a second each), as a real run's does.
The settings are `--fast`'s unless --full. The local line is `facegender.load(...).predict(paths)` in
this process (its default threads), model loading excluded. Each Ray run's results are checked to be
the local ones, row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = ROOT.parent / "shared" / "datasets" / "faces-dev" / "test"


def local_rate(paths: list[str], model_path: str | None, fast: bool) -> tuple[float, list[dict]]:
    import facegender
    from facegender.core.model import FAST

    model = facegender.load(model_path, **(FAST if fast else {}))
    start = time.perf_counter()
    results = [r.to_dict() if hasattr(r, "to_dict") else r for r in model.predict(paths)]
    return len(paths) / (time.perf_counter() - start), results


def ray_rate(paths: list[str], model_path: str | None, fast: bool, workers: int, expected: list[dict]) -> float:
    from facegender.app.ray_predict import predict_ray

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        counts = predict_ray(model_path, paths, str(out), workers=workers, fast=fast, quiet=True)
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    if rows != expected:
        raise SystemExit(f"{workers} worker(s): the Ray results differ from the local ones")
    return counts["photos"] / counts["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--repeat", type=int, default=1, help="list each photo this many times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--full", action="store_true", help="the trained settings instead of --fast's")
    args = parser.parse_args()
    if not args.folder.is_dir():
        print(f"{args.folder} not found: give --folder", file=sys.stderr)
        return 1
    import ray

    from facegender.core.images import iter_paths

    paths = [str(p) for p in iter_paths([args.folder])] * args.repeat
    fast = not args.full
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        rate, expected = local_rate(paths, args.model, fast)
        print(
            f"{len(paths)} photos ({args.folder}, x{args.repeat}), {'fast' if fast else 'trained'} settings, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"  local predict (one process):    {rate:6.1f} photos/s")
        for workers in args.workers:
            rate = ray_rate(paths, args.model, fast, workers, expected)
            print(f"  predict_ray, {workers} worker(s):       {rate:6.1f} photos/s (actor start included)")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
