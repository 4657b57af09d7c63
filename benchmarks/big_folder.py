"""Prediction on big folders: photos/s, time to the first result and peak memory of `facegender
predict` for each output mode, to check that memory stays flat as the folder grows.

    python benchmarks/big_folder.py [SIZE ...] [--modes jsonl csv json] [--source FOLDER] [--model M]

For each SIZE (default 2000 20000 100000) it builds one flat folder of SIZE photos from the few
hundred distinct photos of --source (default ../shared/datasets/faces-ood; skipped with a message
when absent) as hard links (os.link; symlinks where the temporary folder is on another file
system), and for each mode runs `facegender predict --fast --quiet --<mode> --out F FOLDER` as a
child process. Printed per run: wall time, photos/s, seconds until the first result was in F (the
child's start-up and model loading included), and the peak RSS of that child alone (the rusage
`os.wait4` returns for it, ru_maxrss). The output is checked to hold SIZE photos.

The work is real for every photo: prediction keeps no result cache (each file is decoded, its
faces detected, aligned and classified, also when the same bytes were seen under another name);
the only caches on the way are the built dlib network of the bundled model (a model file, made
once) and the OS page cache, which holds the few hundred distinct files after the first pass, so
disk reads cost little here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "faces-ood"


def build_folder(photos: list[Path], size: int, folder: Path) -> Path:
    """`folder` with `size` links to `photos`, taken in turn (00000001_<name>, ...)."""
    folder.mkdir(parents=True)
    link = os.link
    for i in range(size):
        src = photos[i % len(photos)]
        target = folder / f"{i:08d}_{src.name}"
        try:
            link(src, target)
        except OSError:  # another file system: symlinks (followed by the walk like files)
            link = os.symlink
            link(src.resolve(), target)
    return folder


def first_result(out: Path, mode: str, start: float, stop: threading.Event) -> list[float]:
    """Poll `out` from a thread until it holds one photo; [seconds since `start`] (empty if never)."""
    seen: list[float] = []

    def poll() -> None:
        while not stop.is_set():
            data = out.read_bytes() if out.exists() else b""
            if (
                (mode == "jsonl" and b"\n" in data)
                or (mode == "csv" and data.count(b"\n") >= 2)
                or (mode == "json" and b"\n  }" in data)
            ):
                seen.append(time.perf_counter() - start)
                return
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def run_child(folder: Path, mode: str, out: Path, model: str | None) -> dict:
    """One `facegender predict` child: wall seconds, seconds to the first result, peak RSS (MB), exit code."""
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "facegender",
        "predict",
        "--fast",
        "--quiet",
        f"--{mode}",
        "--out",
        str(out),
        *(["--model", model] if model else []),
        str(folder),
    ]
    stop = threading.Event()
    start = time.perf_counter()
    seen = first_result(out, mode, start, stop)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()  # until the child closes it (it ends)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stop.set()
    if proc.returncode not in (0, 1):  # 1: some photo could not be read (reported in the output)
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    return {
        "wall": wall,
        "first": seen[0] if seen else float("nan"),
        "rss_mb": usage.ru_maxrss / 1024,
        "code": proc.returncode,
    }


def count_photos(out: Path, mode: str) -> int:
    """Photos in an output file (distinct `file` values)."""
    import csv
    import json

    with open(out, encoding="utf-8", newline="") as f:
        if mode == "jsonl":
            return len({json.loads(line)["file"] for line in f})
        if mode == "csv":
            return len({row[0] for row in csv.reader(f)}) - 1  # the header
        return len({r["file"] for r in json.load(f)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[2000, 20000, 100000], help="photos per folder")
    parser.add_argument("--modes", nargs="+", choices=["jsonl", "csv", "json"], default=["jsonl", "csv", "json"])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of distinct photos")
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--work", type=Path, help="where the folders are built (default: a temporary folder)")
    args = parser.parse_args()

    from facegender.core.images import expand_paths

    if not args.source.is_dir():
        print(f"{args.source} not found: nothing to build the folders from (pass --source FOLDER); skipped")
        return
    photos = expand_paths([args.source])
    print(
        f"{len(photos)} distinct photos from {args.source}; load average {os.getloadavg()[0]:.1f}; "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'photos':>8} {'mode':>5} {'wall s':>8} {'photos/s':>9} {'first s':>8} {'peak RSS MB':>12}")
    work = Path(tempfile.mkdtemp(prefix="big-folder-", dir=args.work))
    try:
        for size in args.sizes:
            folder = build_folder(photos, size, work / f"photos-{size}")
            for mode in args.modes:
                out = work / f"results.{mode}"
                r = run_child(folder, mode, out, args.model)
                n = count_photos(out, mode)
                if n != size:
                    raise SystemExit(f"{out}: {n} photos, not {size}")
                print(
                    f"{size:>8} {mode:>5} {r['wall']:>8.1f} {size / r['wall']:>9.1f} {r['first']:>8.2f} "
                    f"{r['rss_mb']:>12.0f}",
                    flush=True,
                )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
