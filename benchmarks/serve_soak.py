"""Soak test of `facegender serve`: memory over time under concurrent clients and a mix of bad input.

    python benchmarks/serve_soak.py [--seconds 600] [--clients 16] [--model MODEL] [--shared ../shared]
                                    [-- extra `facegender serve` options, e.g. --fast]

Starts `facegender serve` (the bundled model unless --model) on a free loopback port and sends
POST /predict requests from `--clients` threads for `--seconds`, each request one file drawn in
turn from: the shared group photo (6 faces) and astronaut, the same group photo upscaled to
4,000 px, a 20,000 x 20,000 px PNG "pixel bomb" (a few KB on disk), a text file named .jpg, and
every file of the shared robustness set. The server's RSS (VmRSS of its process) is sampled every
second; the script prints it per 30 s window (max), the plateau (max over the last half), the
requests, the errors (5xx or a failed connection; 4xx answers to bad files are expected) and the
latency percentiles.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads(shared: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every request body kind."""
    group = shared / "images" / "group_6_faces.jpg"
    files = [
        (group.name, group.read_bytes()),
        ("astronaut_female.png", (shared / "images" / "astronaut_female.png").read_bytes()),
    ]
    with Image.open(group) as im:
        big = im.convert("RGB").resize((4000, round(4000 * im.height / im.width)))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    files.append(("group_4000px.jpg", buf.getvalue()))
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG", optimize=True)
    files.append(("pixel_bomb.png", buf.getvalue()))
    files.append(("notes.jpg", b"this is a text file, not a photo\n" * 50))
    robustness = shared / "datasets" / "robustness"
    files += [(p.name, p.read_bytes()) for p in sorted(robustness.rglob("*")) if p.is_file()]
    return files


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("the server did not answer /health")


def client(url: str, bodies, stop: threading.Event, out: dict, lock: threading.Lock) -> None:
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            with lock:
                name, data = next(bodies)
            start = time.perf_counter()
            try:
                status = http.post(f"{url}/predict", files={"files": (name, data)}).status_code
            except httpx.HTTPError:
                status = None
            with lock:
                out["latency"].append(time.perf_counter() - start)
                out["status"][status] = out["status"].get(status, 0) + 1


def report(samples: list[tuple[float, float]], out: dict, seconds: float) -> None:
    windows: dict[int, float] = {}
    for t, rss in samples:
        windows[int(t // 30)] = max(windows.get(int(t // 30), 0.0), rss)
    print("RSS per 30 s window (max MiB):", " ".join(f"{v:.0f}" for _, v in sorted(windows.items())))
    last_half = [rss for t, rss in samples if t >= seconds / 2]
    print(
        f"start {samples[0][1]:.0f} MiB, peak {max(r for _, r in samples):.0f} MiB, "
        f"plateau (max over the last half) {max(last_half):.0f} MiB"
    )
    lat = np.array(out["latency"])
    errors = sum(n for s, n in out["status"].items() if s is None or s >= 500)
    print(
        f"requests {len(lat)} ({len(lat) / seconds:.1f}/s), statuses {dict(sorted(out['status'].items(), key=str))}, "
        f"errors {errors}"
    )
    print(f"latency p50 {np.percentile(lat, 50):.2f} s, p95 {np.percentile(lat, 95):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", help="best_model.pth or .onnx (default: the bundled model)")
    parser.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    bodies = itertools.cycle(payloads(Path(args.shared)))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "facegender",
        "serve",
        "--port",
        str(port),
        *(["--model", args.model] if args.model else []),
        *serve_args,
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        stop, lock, out = threading.Event(), threading.Lock(), {"latency": [], "status": {}}
        threads = [
            threading.Thread(target=client, args=(url, bodies, stop, out, lock), daemon=True)
            for _ in range(args.clients)
        ]
        start, samples = time.monotonic(), []
        for t in threads:
            t.start()
        while (elapsed := time.monotonic() - start) < args.seconds:
            samples.append((elapsed, rss_mib(server.pid)))
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=150)
        print(f"facegender serve {' '.join(serve_args)}: {args.clients} clients for {args.seconds:.0f} s")
        report(samples, out, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
