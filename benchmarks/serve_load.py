"""Load test of `facegender serve`: throughput and latency percentiles under concurrent clients.

    python benchmarks/serve_load.py [--model best_model.pth|model.onnx] [--requests 64] [--concurrency 16]
                                    [--image PHOTO] [--max-concurrent 2] [--onnx]

Starts `facegender serve` in a subprocess on a free loopback port, waits for /health, sends two
warm-up requests, then `--requests` POST /predict requests (one photo each) from `--concurrency`
client threads in this process, and prints throughput, latency p50/p90/p99 and the error count.
Without --model it builds a real-size model: efficientnet_lite0 with ImageNet weights, a random
head and face alignment (as `--preset best` trains), so each request runs face detection,
landmark refinement and classification. --onnx exports that model and serves the .onnx instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE.parent.parent / "shared" / "images" / "astronaut_female.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_concurrent: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "facegender",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-concurrent",
        str(max_concurrent),
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy in time")


def run_load(url: str, image: Path, requests: int, concurrency: int) -> dict:
    data = image.read_bytes()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=600, limits=limits) as client:

        def one(_: int) -> tuple[float, int, float, int]:
            start = time.perf_counter()
            r = client.post(f"{url}/predict", files={"files": (image.name, data, "application/octet-stream")})
            latency = time.perf_counter() - start
            if r.status_code != 200:
                return latency, r.status_code, 0.0, 0
            body = r.json()
            return latency, r.status_code, body["seconds"], len(body["results"][0]["faces"])

        for i in range(2):  # warm-up: detector session, first allocations
            one(i)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    latencies = np.array([r[0] for r in rows]) * 1000
    ok = [r for r in rows if r[1] == 200]
    return {
        "requests": requests,
        "ok": len(ok),
        "errors": requests - len(ok),
        "wall_s": wall,
        "throughput": requests / wall,
        "faces_per_request": ok[0][3] if ok else 0,
        "p50": float(np.percentile(latencies, 50)),
        "p90": float(np.percentile(latencies, 90)),
        "p99": float(np.percentile(latencies, 99)),
        "server_ms": float(np.median([r[2] for r in ok]) * 1000) if ok else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="best_model.pth or .onnx (default: build an efficientnet_lite0 one)")
    parser.add_argument("--onnx", action="store_true", help="export the built model and serve the .onnx")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="the photo every request sends")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-concurrent", type=int, default=2, help="the server's concurrent inferences")
    args = parser.parse_args()
    image = Path(args.image)
    if not image.is_file():
        raise SystemExit(f"--image {image}: file not found")

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            sys.path.insert(0, str(HERE))
            from onnx_latency import build_model_file

            model = build_model_file(Path(tmp) / "best_model.pth", "efficientnet_lite0", 224, align=True)
            if args.onnx:
                from facegender.training.export import export_onnx

                model = Path(export_onnx(model, Path(tmp) / "model.onnx", log=lambda s: None)["out"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(model, port, args.max_concurrent)
        try:
            wait_healthy(url, proc)
            info = httpx.get(f"{url}/model").json()
            res = run_load(url, image, args.requests, args.concurrency)
        finally:
            proc.terminate()
            proc.wait(30)

    print(
        f"\nmodel {info['file']} ({info['runtime']}, {info['backbone']}, faces {info['detects_faces']}), "
        f"image {image.name} ({res['faces_per_request']} face(s)), server --max-concurrent {args.max_concurrent}, "
        f"{os.cpu_count()} CPU(s)"
    )
    print(
        f"{res['requests']} requests, {args.concurrency} concurrent clients: {res['ok']} ok, {res['errors']} errors, "
        f"{res['wall_s']:.1f} s"
    )
    print(
        f"throughput {res['throughput']:.2f} req/s; latency p50 {res['p50']:.0f} ms, p90 {res['p90']:.0f} ms, "
        f"p99 {res['p99']:.0f} ms; server-side inference median {res['server_ms']:.0f} ms"
    )
    if res["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
