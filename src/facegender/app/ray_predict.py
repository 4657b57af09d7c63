"""`facegender predict --ray`: the same prediction as `facegender predict`, on a Ray cluster.

    from facegender.app.ray_predict import predict_ray
    predict_ray(None, ["photos/"], "results.jsonl", fast=True)        # a local Ray instance, every core
    predict_ray("model.onnx", ["s3://bucket/photos/"], "r.parquet", address="ray://head:10001", workers=8,
                fmt="parquet")

How it runs (docs/scale.md): the driver lists the inputs, `ray.data.read_binary_files` reads the
photos' bytes where the workers are, and `map_batches` hands them, a batch at a time, to a pool of
`workers` model actors (`PhotoPredictor`, `cpus_per_worker` CPUs each), each of which loads the model
once. Each photo is named by its path as given, so its result is the local command's, key for key
(bytes and paths are decoded by the same `images.load_image`). The results come back to the driver
in input order and are written there, one photo at a time: `jsonl`, `csv`, `json` or `text` through
`output.ResultWriter` (the local command's formats, bytes and `--resume`), or `parquet`
(`PARQUET_COLUMNS`, `faces` as a JSON string). The package needs `pip install 'facegender[ray]'`;
ray is imported only here, when a Ray run starts.

Inputs are local files and folders (walked on the driver in `images.iter_paths` order; on a
cluster they must be at the same path on every node, e.g. a shared file system) or URIs of one
file system that pyarrow reads (`s3://`, `gs://`, ...; image files only, in Ray's listing order).
A missing local file is an error result, as in the local command, written before the others.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from facegender.core.errors import ConfigError, InputFileError, InputNotFoundError, OutputExistsError, require
from facegender.core.images import IMAGE_EXTENSIONS, ImageError, iter_paths, load_image

#: The columns of `--parquet` output: the keys of a JSON Lines result (`faces`: the list as JSON text;
#: `error`, `width`, `height` are null where the JSON record has no such key).
PARQUET_COLUMNS = ("file", "status", "error", "width", "height", "faces")
#: The output formats of a Ray run: the local command's, and Parquet.
RAY_FORMATS = ("jsonl", "csv", "json", "text", "parquet")
FEATURE = "facegender predict --ray"


def result_dict(result: Any) -> dict:
    """A result as the dict the writers take: a dict as it is, a result object by its `to_dict()`."""
    return result.to_dict() if hasattr(result, "to_dict") else result


# ----------------------------------------------------------------------------- inputs


def split_inputs(names: Iterable[str], done: set[str] = frozenset()) -> tuple[list[str], list[str], str]:
    """(paths for Ray to read, local names that do not exist, the URI scheme prefix or ""). Local
    names are walked here (`iter_paths`: the local command's names and order) minus `done`; URIs go
    to Ray as they are, and must all be of one file system (Ray reads one per dataset)."""
    names = [str(n) for n in names]
    uris = [n for n in names if "://" in n]
    if uris and len(uris) < len(names):
        raise ConfigError("--ray reads either local files and folders or URIs in one run, not both")
    schemes = {u.split("://", 1)[0] for u in uris}
    if len(schemes) > 1:
        raise ConfigError(f"--ray reads URIs of one file system in one run, not {', '.join(sorted(schemes))}")
    if uris:
        return uris, [], f"{schemes.pop()}://"
    paths, missing = [], []
    for path in iter_paths(names):
        name = str(path)
        if name not in done:
            (paths if path.exists() else missing).append(name)
    return paths, missing, ""


def check_inputs(names: list[str]) -> None:
    """The local command's error when there is nothing to predict on (checked before any output is made)."""
    local = [n for n in names if "://" not in n]
    if not names or (len(local) == len(names) and next(iter_paths(local), None) is None):
        raise InputFileError(
            f"no images found in {', '.join(names) or 'the inputs'} (image files end in {', '.join(IMAGE_EXTENSIONS)})"
        )


def missing_result(name: str) -> dict:
    """The result the local command gives a file that is not there (`load_image`'s message)."""
    try:
        load_image(name)
        message = f"{name}: file not found"
    except ImageError as exc:
        message = str(exc)
    return {"file": name, "error": message, "status": "error", "faces": []}


# ----------------------------------------------------------------------------- the model actor


class PhotoPredictor:
    """A Ray Data model actor: loads the model once, then predicts a batch of photos a call.

    `model`: None (the bundled model of the worker's facegender) or (file name, bytes) of a model
    file shipped from the driver; `prefix`: put back before Ray's paths of URIs (`s3://`), which it
    gives without their scheme; `options`: `facegender.load` keyword arguments."""

    def __init__(self, model: tuple[str, bytes] | None, prefix: str = "", **options: Any):
        import facegender

        self.prefix = prefix
        self.model = facegender.load(self._model_file(model), **options)

    @staticmethod
    def _model_file(model: tuple[str, bytes] | None) -> str | None:
        if model is None:
            return None
        name, data = model
        path = Path(tempfile.mkdtemp(prefix="facegender-model-")) / name
        path.write_bytes(data)
        return str(path)

    def _source(self, path: str, data: bytes) -> tuple[str, Any]:
        """(name, what to read): the bytes, or a local empty file's path (the local command's message)."""
        name = path if not self.prefix or path.startswith(self.prefix) else self.prefix + path
        return name, (path if not data and not self.prefix and os.path.exists(path) else data)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        sources = [self._source(str(p), bytes(b)) for p, b in zip(batch["path"], batch["bytes"])]
        records = [json.dumps(result_dict(r), ensure_ascii=False) for r in self.model.predict_iter(sources)]
        return {"result": np.array(records, dtype=object)}


# ----------------------------------------------------------------------------- writers


class ParquetResults:
    """Writes results to one Parquet file (`PARQUET_COLUMNS`), a row group per `rows` results."""

    def __init__(self, path: str, rows: int = 1024):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema(
            [
                ("file", pa.string()),
                ("status", pa.string()),
                ("error", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("faces", pa.string()),
            ]
        )
        where, filesystem = path, None
        if "://" in path:
            filesystem, where = pa.fs.FileSystem.from_uri(path)
        self.writer = pq.ParquetWriter(where, self.schema, filesystem=filesystem)
        self.rows, self.pending, self.stream = rows, [], None

    def write(self, result: dict) -> None:
        self.pending.append(
            {
                **{c: result.get(c) for c in PARQUET_COLUMNS},
                "faces": json.dumps(result.get("faces", []), ensure_ascii=False),
            }
        )
        if len(self.pending) >= self.rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


def open_writer(out: str | None, fmt: str, resume: bool):
    """(writer, keys already done): `output.open_results` for the local formats, `ParquetResults`
    for Parquet (a new file: no resume)."""
    if fmt not in RAY_FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}; one of {', '.join(RAY_FORMATS)}")
    if fmt != "parquet":
        from facegender.app.output import open_results

        writer, kept = open_results(out, fmt, resume)
        return writer, kept.done
    if out is None:
        raise ConfigError("--parquet needs --out FILE")
    if resume:
        raise ConfigError("--resume works with --jsonl, --csv and --json, not --parquet")
    if "://" not in out and Path(out).exists():
        raise OutputExistsError(f"--out {out} exists: delete it or give another --out")
    return ParquetResults(out), set()


# ----------------------------------------------------------------------------- the run


def connect(address: str | None) -> bool:
    """Join Ray: None or "auto": RAY_ADDRESS, else a cluster started on this machine (`ray start
    --head`), else a new local instance; or an address (`ray://HOST:10001`, `HOST:6379`). True when
    this call started the connection (it is shut down at the end); an initialised Ray is used as it is."""
    ray = require("ray", FEATURE)
    if ray.is_initialized():
        return False
    ray.init(address=None if address in (None, "auto") else address)
    return True


def worker_count(workers: int | None, cpus_per_worker: float) -> int:
    """`workers`, or as many actors as the cluster's CPUs hold."""
    import ray

    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, got {workers}")
        return workers
    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))


def _model_payload(model_path: str | os.PathLike | None) -> tuple[str, bytes] | None:
    """The model file to ship to the actors (they need not see the driver's files); None: the bundled one."""
    if model_path is None:
        return None
    path = Path(model_path)
    if not path.is_file():
        raise InputNotFoundError(f"model file {path} not found")
    return path.name, path.read_bytes()


def build_dataset(
    paths: list[str],
    prefix: str,
    model: tuple[str, bytes] | None,
    workers: int,
    batch_size: int,
    cpus_per_worker: float,
    options: dict,
):
    """The lazy Ray dataset of JSON result records (`result` column), in input order."""
    rd = require("ray.data", FEATURE)
    rd.DataContext.get_current().execution_options.preserve_order = True
    # The files are read in the actors: a block of photos a call (map_batches without a batch size fuses
    # the read into the actor pool). Read tasks of their own would need CPUs that the actors hold (the
    # run hangs), or take none and start a process each (the CPUs thrash).
    read: dict[str, Any] = {"include_paths": True}
    if prefix:  # a listed URI folder: image files only (local folders are walked by iter_paths)
        read["file_extensions"] = sorted(
            {e.lstrip(".") for e in IMAGE_EXTENSIONS} | {e.lstrip(".").upper() for e in IMAGE_EXTENSIONS}
        )
    else:  # blocks of about `batch_size` photos, and one per actor at least
        read["override_num_blocks"] = max(1, min(len(paths), max(workers, math.ceil(len(paths) / batch_size))))
    threads = max(1, math.ceil(cpus_per_worker))
    return rd.read_binary_files(paths, **read).map_batches(
        PhotoPredictor,
        batch_size=None,
        batch_format="numpy",
        compute=rd.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        fn_constructor_args=(model, prefix),
        fn_constructor_kwargs={"threads": threads, "workers": threads, "batch_size": batch_size, **options},
    )


def _write_all(ds, missing: list[str], writer, done: set[str], counts: dict) -> None:
    for name in missing:
        _put(missing_result(name), writer, counts)
    if ds is None:
        return
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["result"]:
            result = json.loads(text)
            if result["file"] not in done:  # URIs cannot be left out before they are listed
                _put(result, writer, counts)


def _put(result: dict, writer, counts: dict) -> None:
    writer.write(result)
    counts["photos"] += 1
    counts["failed"] += bool(result.get("error"))


def predict_ray(
    model_path: str | os.PathLike | None,
    inputs: Iterable[str | os.PathLike],
    out: str | None = None,
    address: str | None = None,
    workers: int | None = None,
    fmt: str = "jsonl",
    batch_size: int = 32,
    fast: bool = False,
    threshold: float | None = None,
    resume: bool = False,
    cpus_per_worker: float = 1,
    quiet: bool = False,
    **load_options: Any,
) -> dict[str, int]:
    """Predict on `inputs` (files, folders, URIs) with `workers` model actors on the Ray cluster at
    `address` (see `connect`; None: every CPU of it), writing `fmt` to `out` (None: stdout; Parquet
    needs a file or URI). `fast`: `model.FAST`; `threshold` and `load_options` (tta, refine_steps,
    detect, min_confidence, precision, device) as for `facegender.load`. Returns the counts
    {"photos", "failed", "workers", "seconds"} (the photos written and those with an error)."""
    from facegender.core.model import FAST

    options = {**(FAST if fast else {}), **{k: v for k, v in load_options.items() if v is not None}}
    if threshold is not None:
        options["threshold"] = threshold
    require("ray.data", FEATURE)  # before anything is made
    inputs = [str(i) for i in inputs]
    check_inputs(inputs)
    model = _model_payload(model_path)
    writer, done = open_writer(out, fmt, resume)
    started, counts, start = False, {"photos": 0, "failed": 0, "workers": 0}, time.perf_counter()
    try:
        paths, missing, prefix = split_inputs(inputs, done)
        ds = None
        if paths:
            started = connect(address)
            _quiet_ray(quiet)
            counts["workers"] = worker_count(workers, cpus_per_worker)
            ds = build_dataset(paths, prefix, model, counts["workers"], batch_size, cpus_per_worker, options)
        _write_all(ds, missing, writer, done, counts)
        writer.close()
    finally:
        if getattr(writer, "stream", None) not in (None, sys.stdout):
            writer.stream.close()
        if started:
            import ray

            ray.shutdown()
    counts["seconds"] = time.perf_counter() - start
    return counts


def _quiet_ray(quiet: bool) -> None:
    """No Ray Data progress bars or progress logs with `quiet`."""
    if quiet:
        import logging

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- the command


def _address_and_inputs(args) -> tuple[str, list[str]]:
    """`--ray FOLDER`: argparse took the first input for the address; an existing path is an input."""
    address, images = args.ray, list(args.images)
    if address != "auto" and "://" not in address and os.path.exists(address):
        return "auto", [address, *images]
    return address, images


def run_cli(args) -> int:
    """`facegender predict --ray [ADDRESS]` (cli._run_predict hands over here); exit status as the
    local command's: 1 when a photo could not be read."""
    if args.ray is None:
        raise ConfigError("--parquet is written by Ray runs: add --ray")
    if getattr(args, "annotate", None):
        raise ConfigError("--annotate works without --ray only")
    address, images = _address_and_inputs(args)
    if not images:
        raise ConfigError("name image files, folders or URIs to predict on")
    fmt = next((f for f in ("parquet", "json", "jsonl", "csv") if getattr(args, f, False)), "text")
    counts = predict_ray(
        args.model,
        images,
        args.out,
        address=address,
        workers=args.ray_workers,
        fmt=fmt,
        batch_size=args.batch_size,
        fast=args.fast,
        threshold=args.threshold,
        resume=args.resume,
        quiet=args.quiet,
        detect=args.detect,
        min_confidence=args.min_confidence,
        tta=args.tta,
        refine_steps=args.refine_steps,
        device=args.device,
        precision=args.precision,
    )
    if not args.quiet:
        rate = counts["photos"] / counts["seconds"] if counts["seconds"] else 0.0
        print(
            f"predicted {counts['photos']} photo(s) on Ray with {counts['workers']} worker(s) in "
            f"{counts['seconds']:.1f} s ({rate:.1f} photos/s)",
            file=sys.stderr,
        )
    if counts["failed"]:
        print(f"{counts['failed']} of {counts['photos']} file(s) could not be read", file=sys.stderr)
    return 1 if counts["failed"] else 0
