"""The HTTP server: every endpoint on a real uvicorn server on a free loopback port, the limits,
bad uploads, bounded concurrency, and `facegender serve` itself in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import REPO, make_image, shared_path
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASSES = ["pria", "wanita"]


# ----------------------------------------------------------------------------- helpers


def save_random_model(
    path: Path, align: bool, backbone: str = "resnet18", image_size: int = 64, temperature: float = 1.7
) -> Path:
    """A best_model.pth with random weights, written as `train` writes it (model_record). With
    `align` the model detects and aligns faces, so predictions find every face of a photo; the
    labels themselves are meaningless."""
    from facegender.core.faces.align import FaceAlignConfig
    from facegender.core.preprocessing import Preprocessing
    from facegender.training import checkpoint as ckpt
    from facegender.training.backbones import build_model, get_spec
    from facegender.training.config import build_config

    torch.manual_seed(0)
    cfg = build_config(None, data="unused", backbone=backbone, pretrained=False, image_size=image_size, align=align)
    spec = get_spec(backbone)
    prep = Preprocessing(
        image_size, spec.mean, spec.std, face=FaceAlignConfig(size=image_size).to_dict() if align else None
    )  # as train.py does
    model, source = build_model(backbone, len(CLASSES), cfg.dropout, pretrained=False)
    record = ckpt.model_record(
        model,
        cfg.to_dict(),
        CLASSES,
        prep,
        source,
        epoch=1,
        temperature=temperature,
        tta=False,
        metrics={"best_epoch": 1, "test": {"accuracy": 0.5, "n": 8}},
    )
    return ckpt.save_atomic(record, path)


@contextlib.contextmanager
def running(app):
    """Run `app` with uvicorn in a background thread on a free loopback port; yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: what a
    decompression bomb looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("serve") / "best_model.pth", align=True)


LIMITS = dict(max_file_bytes=400_000, max_request_bytes=1_000_000, max_files=3, max_pixels=2_000_000)


@pytest.fixture(scope="module")
def app(aligned_model):
    from facegender.app.serve import create_app

    return create_app(aligned_model, device="cpu", **LIMITS)


@pytest.fixture(scope="module")
def server(app) -> str:
    with running(app) as url:
        yield url


# ----------------------------------------------------------------------------- endpoints


def test_health_model_and_docs(server):
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "model": "best_model.pth", "runtime": "pytorch"}

    info = httpx.get(f"{server}/model").json()
    assert info["backbone"] == "resnet18" and info["classes"] == CLASSES
    assert info["temperature"] == pytest.approx(1.7) and info["tta"] is False
    assert info["preprocessing"]["image_size"] == 64 and info["preprocessing"]["face"]["size"] == 64
    assert info["detects_faces"] is True
    assert info["metrics"]["test"]["accuracy"] == 0.5
    assert info["limits"]["max_pixels"] == LIMITS["max_pixels"]

    docs = httpx.get(f"{server}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(f"{server}/openapi.json").json()
    assert set(schema["paths"]) >= {"/predict", "/health", "/model"}
    assert "/" not in schema["paths"]


def test_index_page_has_no_external_assets(server):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="file"' in page and 'type="file"' in page and "predict" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must load nothing from elsewhere"
    assert not re.search(r"https?://", page)
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_predict_group_photo_and_bad_file_in_one_request(server):
    group = shared_path("images", "group_6_faces.jpg").read_bytes()
    files = [
        ("files", ("notes.txt", b"this is not an image", "text/plain")),
        ("files", ("group.jpg", group, "image/jpeg")),
    ]
    r = httpx.post(f"{server}/predict", files=files, timeout=120)
    assert r.status_code == 200, r.text
    bad, photo = r.json()["results"]
    assert bad["file"] == "notes.txt" and bad["status"] == "error" and bad["faces"] == []
    assert "notes.txt" in bad["error"] and "not a readable image" in bad["error"]

    assert photo["file"] == "group.jpg" and photo["status"] == "ok" and photo["index"] == 1
    assert (photo["width"], photo["height"]) == Image.open(io.BytesIO(group)).size
    faces = photo["faces"]
    assert len(faces) == 6
    centres = sorted((f["box"][0] + f["box"][2]) / 2 for f in faces)
    assert min(np.diff(centres)) > 50, "six different faces, side by side"
    for f in faces:
        x1, y1, x2, y2 = f["box"]
        assert 0 <= x1 < x2 <= photo["width"] and 0 <= y1 < y2 <= photo["height"]
        assert len(f["landmarks"]) == 5
        assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in f["landmarks"])
        assert f["label"] in CLASSES and f["label"] == max(f["probabilities"], key=f["probabilities"].get)
        assert 0.5 <= f["probability"] <= 1 and sum(f["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_predict_reports_no_face(server, tmp_path):
    path = make_image(tmp_path / "stripes.png", 0, np.random.default_rng(0), size=96)
    r = httpx.post(f"{server}/predict", files={"files": ("stripes.png", path.read_bytes(), "image/png")}, timeout=60)
    (result,) = r.json()["results"]
    assert result["status"] == "no face found" and result["faces"] == []
    assert (result["width"], result["height"]) == (96, 96)


def test_duplicate_file_names_keep_their_own_results(server, tmp_path):
    rng = np.random.default_rng(1)
    small = encode(Image.open(make_image(tmp_path / "a.png", 0, rng, size=40)))
    r = httpx.post(
        f"{server}/predict",
        files=[("files", ("same.png", small, "image/png")), ("files", ("same.png", b"broken", "image/png"))],
        timeout=60,
    )
    first, second = r.json()["results"]
    assert first["status"] == "no face found" and first["width"] == 40
    assert second["status"] == "error"


def test_predict_needs_files(server):
    r = httpx.post(f"{server}/predict", data={"other": "x"})
    assert r.status_code == 422 and "files" in r.json()["detail"]


# ----------------------------------------------------------------------------- limits


def test_file_over_the_byte_limit_is_refused(server):
    big = os.urandom(LIMITS["max_file_bytes"] + 1)
    r = httpx.post(f"{server}/predict", files={"files": ("huge.jpg", big, "image/jpeg")})
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "huge.jpg" in detail and f"{LIMITS['max_file_bytes']:,}" in detail


def test_request_over_the_byte_limit_is_refused_before_reading(server):
    part = os.urandom(LIMITS["max_file_bytes"] - 1000)
    files = [("files", (f"p{i}.jpg", part, "image/jpeg")) for i in range(3)]  # each file fits, not all
    r = httpx.post(f"{server}/predict", files=files)
    assert r.status_code == 413 and "request body" in r.json()["detail"]


def test_chunked_request_over_the_byte_limit_is_refused(server):
    def body():  # a valid multipart stream without Content-Length: the server has to count
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n\r\n'
        for _ in range(30):
            yield b"x" * 50_000
        yield b"\r\n--b--\r\n"

    r = httpx.post(f"{server}/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "request body" in r.json()["detail"]


def test_too_many_files(server):
    tiny = encode(Image.new("RGB", (8, 8)))
    files = [("files", (f"t{i}.png", tiny, "image/png")) for i in range(LIMITS["max_files"] + 1)]
    r = httpx.post(f"{server}/predict", files=files)
    assert r.status_code == 413 and "too many files" in r.json()["detail"]


@pytest.mark.parametrize("side", [1500, 60_000])  # over the limit; over Pillow's own bomb limit too
def test_too_many_pixels_is_refused_from_the_header(server, side):
    data = png_header(side, side)
    assert len(data) < 200  # a few bytes that would decode to side*side*3 bytes
    r = httpx.post(f"{server}/predict", files={"files": ("bomb.png", data, "image/png")})
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "bomb.png" in detail and ("pixels" in detail or "decompression bomb" in detail)


def test_a_real_image_over_the_pixel_limit(server):
    blank = encode(Image.new("RGB", (2000, 1001), "white"))  # 2,002,000 pixels, a few kB
    assert len(blank) < LIMITS["max_file_bytes"]
    r = httpx.post(f"{server}/predict", files={"files": ("blank.png", blank, "image/png")})
    assert r.status_code == 413 and "2000x1001" in r.json()["detail"]


def test_limits_must_be_positive(aligned_model):
    from facegender.app.serve import create_app

    with pytest.raises(ValueError, match="max_concurrent"):
        create_app(aligned_model, device="cpu", max_concurrent=0)


# ----------------------------------------------------------------------------- concurrency


class _BlockedLogits:
    """A logits function that waits until `release` is set, and records how many calls overlap
    and how many have finished."""

    def __init__(self):
        self.release = threading.Event()
        self.active = 0
        self.most = 0
        self.finished = 0
        self.lock = threading.Lock()

    def __call__(self, batch) -> np.ndarray:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        self.release.wait(60)
        with self.lock:
            self.active -= 1
            self.finished += 1
        return np.zeros((batch.shape[0], len(CLASSES)), dtype=np.float32)


def test_inference_is_bounded_and_off_the_event_loop(aligned_model):
    """Ordering, not time: while two inferences are held inside the model, /health answers (the event
    loop is free) and no third inference has started (at most max_concurrent at once)."""
    from facegender.app.predict import Predictor
    from facegender.app.serve import create_app
    from facegender.core.preprocessing import Preprocessing

    blocked = _BlockedLogits()
    predictor = Predictor(CLASSES, Preprocessing(image_size=16), blocked, info={"backbone": "stub"})
    app = create_app(aligned_model, predictor=predictor, max_concurrent=2)
    image = encode(Image.new("RGB", (20, 20), "gray"))
    with running(app) as url, httpx.Client(timeout=60) as client:

        def post(i: int) -> dict:
            return client.post(f"{url}/predict", files={"files": (f"{i}.png", image, "image/png")}).json()

        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(post, i) for i in range(6)]
            deadline = time.monotonic() + 60
            while blocked.active < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            health = client.get(f"{url}/health")
            state_at_health = (blocked.active, blocked.finished)
            blocked.release.set()
            answers = [p.result() for p in pending]
    assert health.status_code == 200 and state_at_health == (2, 0), (
        "the event loop must answer while inferences run, and at most 2 run at once"
    )
    assert blocked.most == 2, f"at most 2 inferences at once, and 2 do run together (saw {blocked.most})"
    for i, a in enumerate(answers):
        (result,) = a["results"]
        assert result["file"] == f"{i}.png" and result["faces"][0]["probability"] == 0.5


# ----------------------------------------------------------------------------- the command


def test_is_loopback():
    from facegender.app.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))


def test_serve_warns_when_not_on_loopback_and_divides_threads(aligned_model, monkeypatch, capsys):
    import uvicorn

    from facegender.app.serve import serve

    calls, threads = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    serve(aligned_model, host="0.0.0.0", port=8123, device="cpu", max_concurrent=4)
    assert "WARNING" in capsys.readouterr().out and calls[0][1]["host"] == "0.0.0.0"
    assert threads == [2] and calls[0][0].state.predictor.detector.threads == 2  # 8 cores / 4 concurrent
    serve(aligned_model, port=8124, device="cpu", threads=3)
    out = capsys.readouterr().out
    assert "WARNING" not in out and "http://127.0.0.1:8124/" in out and calls[1][1]["host"] == "127.0.0.1"
    assert threads == [2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_facegender_serve_command(aligned_model):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "facegender",
            "serve",
            "--model",
            str(aligned_model),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {proc.stdout.read() if proc.stdout else ''}") from None
                time.sleep(0.3)
        assert health.json()["model"] == "best_model.pth"
        assert httpx.get(f"http://127.0.0.1:{port}/model").json()["classes"] == CLASSES
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in out and "WARNING" not in out
