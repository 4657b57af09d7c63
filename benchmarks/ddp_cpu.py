"""Training throughput of one process against two torchrun processes (DistributedDataParallel, Gloo)
on this machine's CPU, with the real `facegender train` command.

    nice -n 5 .venv/bin/python benchmarks/ddp_cpu.py --data ../shared/datasets/faces-dev

Three runs on the same subset of the dataset (symlinked into a temporary folder), same global batch:

- 1 process x 2 threads   (OMP_NUM_THREADS=2, the usual single-process run)
- 1 process x 1 thread    (OMP_NUM_THREADS=1)
- 2 processes x 1 thread  (torchrun --nproc_per_node=2, --batch-size halved: the same global batch)

Printed per run: training images/second of the last epoch (global, all processes; from
summary.csv, so reading images and evaluation are not in it), seconds of that epoch, and the wall
time of the whole command (start-up, reading, validation and the final test evaluation included).
The load average is printed before and after: on a machine shared with other work the figures
move with it. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subset(src: Path, dst: Path, train_per_class: int, test_per_class: int) -> Path:
    """A dataset of symlinks: the first N images of each class of src/train and src/test."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())[:n]
            target = dst / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                (target / f.name).symlink_to(f.resolve())
    return dst


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, processes: int, threads: int, batch: int, data: Path, out: Path, args) -> dict:
    common = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--backbone",
        args.backbone,
        "--no-pretrained",
        "--image-size",
        str(args.image_size),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(batch),
        "--precision",
        "fp32",
        "--quiet",
    ]
    if processes == 1:
        cmd = [sys.executable, "-m", "facegender", *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "facegender",
            *common,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{name}: the command failed with exit status {proc.returncode}")
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {
        "name": name,
        "img_s": float(last["images_per_sec"]),
        "epoch_s": float(last["seconds"]),
        "wall_s": wall,
        "cmd": " ".join(["OMP_NUM_THREADS=" + str(threads), *[Path(cmd[0]).name, *cmd[1:]]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "faces-dev"))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (2 processes use half each)")
    parser.add_argument("--epochs", type=int, default=2, help="the last epoch is reported (the first warms up)")
    parser.add_argument("--train-per-class", type=int, default=96)
    parser.add_argument("--test-per-class", type=int, default=16)
    args = parser.parse_args()
    src = Path(args.data)
    if not (src / "train").is_dir():
        raise SystemExit(f"{src}/train not found; pass --data DATASET (e.g. ../shared/datasets/faces-dev)")

    print(
        f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; torch threads "
        f"follow OMP_NUM_THREADS"
    )
    with tempfile.TemporaryDirectory(prefix="ddp_cpu_") as tmp:
        tmp = Path(tmp)
        data = subset(src, tmp / "data", args.train_per_class, args.test_per_class)
        plans = [
            ("1 process x 2 threads", 1, 2, args.batch_size),
            ("1 process x 1 thread", 1, 1, args.batch_size),
            ("2 processes x 1 thread", 2, 1, args.batch_size // 2),
        ]
        results = []
        for name, procs, threads, batch in plans:
            results.append(run(name, procs, threads, batch, data, tmp / f"out{len(results)}", args))
            r = results[-1]
            print(f"  done: {name}: {r['img_s']:.1f} img/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"\n{args.backbone} {args.image_size}px, fp32, global batch {args.batch_size}, "
        f"{2 * args.train_per_class} train images (85% trained, 15% validation), epoch {args.epochs} of "
        f"{args.epochs} reported"
    )
    print(f"{'run':<24} {'train img/s':>11} {'epoch s':>8} {'wall s':>7}")
    for r in results:
        print(f"{r['name']:<24} {r['img_s']:>11.1f} {r['epoch_s']:>8.1f} {r['wall_s']:>7.1f}")
    base = results[0]["img_s"]
    print(f"\n2 processes vs 1 process x 2 threads: {results[2]['img_s'] / base:.2f}x training throughput")
    print("\ncommands:")
    for r in results:
        print(f"  {r['cmd']}")


if __name__ == "__main__":
    main()
