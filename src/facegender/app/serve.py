"""`facegender serve`: an HTTP API and a small web page over `core.model.Model`.

Endpoints (see /docs for the OpenAPI description):

- `GET /`: a page to pick or drop a photo; it draws every face's box and label on the photo.
- `POST /predict`: multipart form, field `files` (repeat it for several images). One result per
  file, in order: every face with box, landmarks, label, calibrated probability and `uncertain`
  flag, or status `no face found`, or status `error` with the reason (a file that is not an image
  does not fail the others). Query parameter `threshold` (0 < T < 1): this request's decision
  threshold instead of the server's (`--threshold`, else the model's stored one).
- `GET /health`: liveness and the loaded model's file name.
- `GET /model`: backbone, classes, preprocessing, temperature, decision threshold and uncertain
  band, training metrics, the limits.

The model (`best_model.pth` or an exported `.onnx`) is loaded once (`core.model.load`), when the app
is made, into `app.state.predictor`; it holds no per-request state. Inference runs in a worker thread, never
on the event loop, and at most `max_concurrent` requests run inference at once (the others wait).

Limits, all answered with a JSON `{"detail": "..."}` that says what to change:
- request body above `max_request_bytes`: 413 (checked from Content-Length before reading, and
  while reading for bodies without one);
- a file above `max_file_bytes`, or more than `max_files` files: 413;
- an image with more than `max_pixels` pixels: 413, decided from the image header before anything
  is decoded (decompression bombs are refused without being expanded).

The server listens on 127.0.0.1 unless told otherwise; any other address prints a warning.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time, and
# they name classes imported inside the functions that add the routes.
import asyncio
import io
import ipaddress
import json
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException

from facegender.core.errors import ConfigError
from facegender.core.memory import limit_heap_arenas, release_heap
from facegender.core.results import PhotoResult

MB = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

#: The page at `/` may load nothing from elsewhere; the browser enforces it.
INDEX_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'self'"
)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server."""

    max_file_bytes: int = 20 * MB  # one uploaded file
    max_request_bytes: int = 64 * MB  # the whole request body
    max_files: int = 32  # files in one request
    max_pixels: int = 40_000_000  # width * height of one image (40 MP)
    max_concurrent: int = 2  # requests running inference at the same time

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve limit {name} must be a positive whole number, got {value!r}")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def pixel_problem(name: str, data: bytes, max_pixels: int) -> str | None:
    """Why the image in `data` has too many pixels, judged from its header alone (nothing is
    decoded); None when it is within the limit or not recognised as an image (unreadable files
    are reported per file later, by `load_image`)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:
        return f"{name}: refused as a decompression bomb ({exc}); downscale it first"
    except Exception:  # noqa: BLE001 - anything unreadable is reported by load_image later
        return None
    if width * height > max_pixels:
        return (
            f"{name}: {width}x{height} pixels is more than the limit of {max_pixels:,} pixels per image; "
            "downscale it first (server option --max-pixels)"
        )
    return None


def model_summary(predictor, model_path: str | Path, limits: ServeLimits) -> dict[str, Any]:
    """What GET /model returns: plain JSON data about the loaded model."""
    info = predictor.info
    return json.loads(
        json.dumps(
            {
                "file": Path(model_path).name,
                "runtime": "onnxruntime" if str(model_path).lower().endswith(".onnx") else "pytorch",
                "precision": getattr(predictor, "precision", "fp32"),
                "backbone": info.get("backbone"),
                "classes": predictor.classes,
                "preprocessing": predictor.prep.to_dict(),
                "detects_faces": predictor.detector is not None,
                "temperature": predictor.temperature,
                "tta": predictor.tta,
                "threshold": getattr(predictor, "threshold", None),
                "uncertain_band": getattr(predictor, "uncertain_band", None),
                "pretrained": info.get("pretrained"),
                "epoch": info.get("epoch"),
                "metrics": info.get("metrics"),
                "limits": asdict(limits),
            },
            default=str,
        )
    )


def predict_uploads(predictor, uploads: list[tuple[str, bytes]], max_pixels: int) -> list[PhotoResult]:
    """Results for (name, bytes) pairs, in order: faces, `no face found`, or a per-file error
    (`core.model.Model.predict_sources`: images decoded and detected in its worker threads). Runs
    in a worker thread; uses only its arguments (no shared per-request state). The decoded images
    are freed by then, and their memory is handed back to the system (`release_heap`)."""
    try:
        return predictor.predict_sources(uploads, max_pixels=max_pixels)
    finally:
        release_heap()


def predict_response(results: list[PhotoResult], seconds: float) -> dict[str, Any]:
    """The body of a POST /predict answer: each result's `to_dict()` with its `index` in the
    request, and the seconds of decoding and inference (not queueing)."""
    return {"results": [{**r.to_dict(), "index": i} for i, r in enumerate(results)], "seconds": round(seconds, 4)}


class BodySizeLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 with a JSON message. The
    Content-Length header is checked before anything is read; bodies without one (chunked) are
    counted while they arrive, so nothing larger than the limit is ever held."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return (
            f"request body is larger than the limit of {_size(self.max_bytes)}; "
            "send fewer or smaller images (server option --max-request-mb)"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        too_large = JSONResponse({"detail": self.message()}, status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(413, self.message())
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await too_large(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised while the body is read. FastAPI passes HTTPExceptions from body parsing on (others
    become a 400), so its handler answers 413 with this message; BodySizeLimit catches what is left."""


def index_html() -> str:
    return resources.files("facegender").joinpath("app/static/index.html").read_text(encoding="utf-8")


def create_app(
    model_path: str | Path,
    device: str = "auto",
    limits: ServeLimits | None = None,
    predictor=None,
    threads: int | None = None,
    precision: str = "fp32",
    fast: bool = False,
    threshold: float | None = None,
    **limit_overrides: int,
):
    """The FastAPI app serving `model_path` (.pth or .onnx). Limits come from `limits` and/or
    keyword overrides (`max_file_bytes=...`). `predictor` reuses an already loaded `core.model.Model`;
    `threads` are the threads per inference (ONNX Runtime: detector and classifier; PyTorch);
    `fast`: `core.model.FAST` settings (no landmark refinement, no TTA); `threshold`: the server's
    decision threshold (None: the model's stored one)."""
    from fastapi import FastAPI

    from facegender import __version__

    limits = ServeLimits(**{**asdict(limits or ServeLimits()), **limit_overrides})
    predictor = _serving_model(
        model_path, predictor, device=device, precision=precision, threads=threads, fast=fast, threshold=threshold
    )
    summary = model_summary(predictor, model_path, limits)
    app = FastAPI(
        title="facegender",
        version=__version__,
        description="Face gender classification: every face in a photo with box, landmarks, label and "
        f"calibrated probability. Model: {summary['file']} ({summary['backbone']}, "
        f"classes {', '.join(summary['classes'])}).",
    )
    app.state.predictor = predictor
    app.state.limits = limits
    app.state.summary = summary
    app.state.inference_slots = asyncio.Semaphore(limits.max_concurrent)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)
    _add_error_handler(app, limits)
    _add_info_routes(app, summary, index_html())
    _add_predict_route(app, predictor, limits)
    return app


def _serving_model(
    model_path: str | Path,
    predictor,
    device: str,
    precision: str,
    threads: int | None,
    fast: bool,
    threshold: float | None,
):
    """The model the app serves: `predictor` (at `threshold` when one is given), else loaded from `model_path`."""
    from facegender.core.model import FAST, load

    chosen = {} if threshold is None else {"threshold": threshold}
    if predictor is None:
        # No onnxruntime memory arenas: each keeps its largest request's buffers for good (serve_soak).
        return load(
            model_path,
            device=device,
            precision=precision,
            threads=threads,
            arena=False,
            **(FAST if fast else {}),
            **chosen,
        )
    return predictor.replace(**chosen) if chosen else predictor


def _add_error_handler(app, limits: ServeLimits) -> None:
    from fastapi import Request
    from fastapi.exception_handlers import http_exception_handler

    @app.exception_handler(HTTPException)
    async def explain_http_errors(request: Request, exc: HTTPException):
        """The multipart parser's own "Too many files" (400) becomes our 413 with the limit."""
        if exc.status_code == 400 and "Too many files" in str(exc.detail):
            exc = HTTPException(413, _too_many_files(limits))
        return await http_exception_handler(request, exc)


def _add_info_routes(app, summary: dict[str, Any], page: str) -> None:
    """GET /, /health and /model."""
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": INDEX_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/health", summary="Liveness and the loaded model")
    async def health() -> dict:
        return {"status": "ok", "model": summary["file"], "runtime": summary["runtime"]}

    @app.get("/model", summary="The loaded model: backbone, classes, preprocessing, metrics, limits")
    async def model() -> dict:
        return summary


def _add_predict_route(app, predictor, limits: ServeLimits) -> None:
    """POST /predict: the uploads checked against `limits`, then predicted in a worker thread, at
    most `max_concurrent` requests at once."""
    from fastapi import File, Query, UploadFile
    from starlette.concurrency import run_in_threadpool

    @app.post("/predict", summary="Label every face in one or more images", form_limits={"max_files": limits.max_files})
    async def predict(
        files: list[UploadFile] | None = File(None, description="image files (repeat the field)"),
        threshold: float | None = Query(
            None,
            gt=0,
            lt=1,
            description=(
                "decision threshold on the probability of the model's second class for this request "
                "(default: the server's)"
            ),
        ),
    ) -> dict:
        uploads = await _read_uploads(files, limits)
        async with app.state.inference_slots:
            start = time.perf_counter()
            model = predictor if threshold is None else predictor.replace(threshold=threshold)
            results = await run_in_threadpool(predict_uploads, model, uploads, limits.max_pixels)
            seconds = time.perf_counter() - start
        return predict_response(results, seconds)


async def _read_uploads(files, limits: ServeLimits) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded file; an HTTPException (422, 413) for none, too many, too
    large or too many pixels."""
    if not files:
        raise HTTPException(
            422,
            "no images: send one or more image files in the multipart form field `files`, "
            "e.g. curl -F files=@photo.jpg http://127.0.0.1:8000/predict",
        )
    if len(files) > limits.max_files:
        raise HTTPException(413, _too_many_files(limits))
    uploads = []
    for i, f in enumerate(files):
        name = f.filename or f"file{i + 1}"
        if f.size is not None and f.size > limits.max_file_bytes:
            raise HTTPException(413, _file_too_large(name, f.size, limits))
        data = await f.read()
        if len(data) > limits.max_file_bytes:
            raise HTTPException(413, _file_too_large(name, len(data), limits))
        problem = pixel_problem(name, data, limits.max_pixels)
        if problem:
            raise HTTPException(413, problem)
        uploads.append((name, data))
    return uploads


def _size(n: int) -> str:
    return f"{n / MB:g} MB ({n:,} bytes)" if n >= MB else f"{n:,} bytes"


def _too_many_files(limits: ServeLimits) -> str:
    return f"too many files in one request (the limit is {limits.max_files}); split them over several requests"


def _file_too_large(name: str, size: int, limits: ServeLimits) -> str:
    return (
        f"{name}: {size:,} bytes is more than the limit of {_size(limits.max_file_bytes)} per file; "
        "send a smaller image (server option --max-file-mb)"
    )


def serve(
    model_path: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "auto",
    log_level: str = "info",
    threads: int | None = None,
    precision: str = "fp32",
    fast: bool = False,
    threshold: float | None = None,
    **limits: int,
) -> None:
    """Load the model and run the server until Ctrl-C (uvicorn, one process).

    `threads` per inference (PyTorch and ONNX Runtime) defaults to the CPU count divided by
    max_concurrent, so that concurrent requests do not oversubscribe the cores: on a busy 2-core
    machine, two threads per inference made an efficientnet_lite0 forward pass 6x slower than one.
    """
    import os

    import uvicorn

    if not is_loopback(host):
        print(
            f"WARNING: listening on {host}: other machines can reach this server. It has no authentication "
            "or TLS; put it behind a reverse proxy that provides them, or use the default --host 127.0.0.1."
        )
    limit_heap_arenas()
    concurrent = limits.get("max_concurrent", ServeLimits.max_concurrent)
    threads = threads or max(1, (os.cpu_count() or 1) // concurrent)
    app = create_app(
        model_path, device=device, threads=threads, precision=precision, fast=fast, threshold=threshold, **limits
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"facegender: serving {app.state.summary['file']} on http://{shown}:{port}/  (API docs: /docs); "
        f"{concurrent} concurrent inference(s) x {threads} thread(s)"
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
