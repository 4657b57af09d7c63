"""`facegender prepare`: detect and align the faces of a whole dataset once, into a new folder.

RAW/train/<class>/... and RAW/test/<class>/... become OUT/train/<class>/... and OUT/test/<class>/...
(same relative paths, written as .jpg quality 95 or .png): each image is replaced by the aligned
crop of its largest face, exactly as `train --align` would prepare it (`core.faces.detect.align_or_fallback`).
An image where no face is found gets the same centred, padded crop as in training; an image with
several faces keeps the largest one (or is left out with `single_face_only`).

OUT is then an ordinary dataset for `facegender train --data OUT`. It also holds
`facegender_preprocessing.json` (the FaceAlignConfig used): training reads it, records the face
stage in the model file (so that predict detects and aligns faces in new photos as it should)
and only resizes the already aligned images instead of aligning them again. `evaluate` does the
same on OUT/test.

The work is resumable: an output that exists and is newer than its source is kept, as long as the
face settings are the ones recorded in OUT. `prepare_report.json` lists images with no face, with
several faces and unreadable files; `prepare_report.txt` is the same for people.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from facegender.core.errors import ConfigError, InputFileError
from facegender.core.files import atomic_path, write_text_atomic
from facegender.core.images import ImageError, load_image
from facegender.data.dataset import DatasetError, format_problems, scan_dataset

#: Written into a prepared dataset; `train` and `evaluate` look for it.
MARKER = "facegender_preprocessing.json"
REPORT_JSON = "prepare_report.json"
REPORT_TXT = "prepare_report.txt"
FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {})}

# Per-image outcomes in the report.
OK, NO_FACE, MULTIPLE, SKIPPED_MULTIPLE, UNREADABLE = (
    "ok",
    "no_face",
    "multiple_faces",
    "skipped_multiple_faces",
    "unreadable",
)


@dataclass
class PrepareResult:
    """What `prepare_dataset` did; `report` is what prepare_report.json holds."""

    out: Path
    report: dict
    written: int = 0
    reused: int = 0
    per_file: dict = field(default_factory=dict)


def read_marker(folder: str | os.PathLike, check_parent: bool = False) -> dict | None:
    """The `facegender prepare` record of a dataset folder (with `check_parent`, also of its parent:
    for OUT/test), or None for an ordinary folder. Raises DatasetError for an unfinished preparation."""
    folder = Path(folder)
    for candidate in (folder / MARKER, *([folder.parent / MARKER] if check_parent else [])):
        if candidate.is_file():
            try:
                marker = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DatasetError(f"{candidate}: unreadable ({exc}); run facegender prepare again") from None
            if not marker.get("complete"):
                raise DatasetError(
                    f"{candidate.parent}: `facegender prepare` did not finish; run it again with "
                    f"the same --out to complete it"
                )
            return marker
    return None


def same_face_settings(a: dict, b: dict) -> bool:
    """Two FaceAlignConfig dicts that crop faces alike (the output size aside)."""
    from facegender.core.faces.align import FaceAlignConfig

    def norm(d: dict) -> dict:
        return {**FaceAlignConfig.from_dict(d).to_dict(), "size": 0}

    return norm(a) == norm(b)


def loader_preprocessing(prep, folder: str | os.PathLike, log: Callable[[str], None] = print):
    """The preprocessing to read `folder` with for a model whose preprocessing is `prep`: without
    the face stage when `facegender prepare` already aligned the folder (aligning twice would move
    the crop), else `prep` itself."""
    import dataclasses

    prepared = read_marker(folder, check_parent=True)
    if prepared is None or prep.face is None:
        return prep
    if not same_face_settings(prepared["face"], prep.face):
        log(
            f"WARNING: {folder} was aligned by `facegender prepare` with other face settings than this "
            "model's; the crops differ from the model's own (evaluate on the original images instead)"
        )
    return dataclasses.replace(prep, face=None)


def output_paths(sources: list[Path], raw: Path, out: Path, fmt: str) -> dict[Path, Path]:
    """Source -> output path: the same relative path with the new extension; where two sources
    would collide (a.jpg and a.png), the later keeps its old extension in the name (a.png.jpg)."""
    mapping, taken = {}, set()
    for src in sources:
        rel = src.relative_to(raw)
        target = out / rel.with_suffix("." + fmt)
        if target in taken:
            target = out / rel.parent / f"{rel.name}.{fmt}"
        taken.add(target)
        mapping[src] = target
    return mapping


def _save(image: Image.Image, target: Path, fmt: str) -> None:
    kind, options = FORMATS[fmt]
    with atomic_path(target) as tmp:
        image.save(tmp, format=kind, **options)


def prepare_dataset(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    face: dict | None = None,
    single_face_only: bool = False,
    skip_bad: bool = False,
    fmt: str = "jpg",
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Align every image of RAW/train and RAW/test into OUT (see the module docstring).

    `face`: FaceAlignConfig overrides (size, margin, refine_steps...). Unreadable images stop the
    run with a DatasetError listing them all (after the report is written), unless `skip_bad`.
    """
    from facegender.core.faces.align import FaceAlignConfig
    from facegender.core.faces.detect import FaceDetector

    raw, out = _check_folders(raw, out, fmt)
    config = FaceAlignConfig.from_dict(face or {})
    classes, train, test = scan_dataset(raw, need_test=False)
    sources = list(train.paths) + (list(test.paths) if test is not None else [])
    targets = output_paths(sources, raw, out, fmt)
    settings = json.loads(json.dumps({"face": config.to_dict(), "format": fmt, "single_face_only": single_face_only}))
    previous = _previous_outcomes(out, settings, targets, log)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"facegender_prepare": 1, **settings, "source": str(raw.resolve()), "classes": classes, "complete": False}
    _write_json(marker, out / MARKER)

    detector = FaceDetector(config, threads=threads)
    align = functools.partial(
        _prepare_one, detector=detector, config=config, single_face_only=single_face_only, fmt=fmt
    )
    result = PrepareResult(out, {})
    started = time.perf_counter()
    try:
        for src in tqdm(sources, desc="aligning faces", unit="img", disable=not progress):
            _align_source(src, raw, targets[src], previous, result, align)
    except KeyboardInterrupt:  # keep what was done, so that the next run resumes
        _write_json(build_report(raw, out, settings, result, time.perf_counter() - started), out / REPORT_JSON)
        raise

    result.report = _write_report(build_report(raw, out, settings, result, time.perf_counter() - started), out, log)
    _check_outcome(raw, result, skip_bad)
    marker["complete"] = True
    _write_json(marker, out / MARKER)
    return result


def _check_folders(raw: str | os.PathLike, out: str | os.PathLike, fmt: str) -> tuple[Path, Path]:
    """(RAW, OUT) as paths, once the format is known, OUT is a new folder outside RAW and RAW is
    not itself a prepared folder."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    raw, out = Path(raw), Path(out)
    if out.resolve() == raw.resolve() or raw.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} must not be inside --data {raw}; choose a new folder")
    if (raw / MARKER).is_file():
        raise InputFileError(f"{raw} is already the output of `facegender prepare`; pass the original images")
    return raw, out


def _previous_outcomes(out: Path, settings: dict, targets: dict[Path, Path], log: Callable[[str], None]) -> dict:
    """The per-file outcomes of an earlier run into OUT, reused only if it had the same settings;
    with other settings its outputs are deleted (every image is aligned again)."""
    marker_path = out / MARKER
    if not marker_path.is_file():
        return {}
    try:
        old = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    if {k: old.get(k) for k in settings} == settings:
        try:
            return json.loads((out / REPORT_JSON).read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            return {}
    log(f"note: {out} was prepared with other settings; every image is aligned again")
    for target in targets.values():
        target.unlink(missing_ok=True)
    return {}


def _align_source(
    src: Path, raw: Path, target: Path, previous: dict, result: PrepareResult, align: Callable[[Path, Path], dict]
) -> None:
    """Record one source's outcome in `result`: the previous one while still valid, else that of
    `align(src, target)` (`_prepare_one`)."""
    rel = str(src.relative_to(raw))
    if _still_valid(previous.get(rel), src, target):
        result.per_file[rel] = previous[rel]
        result.reused += 1
        return
    entry = align(src, target)
    entry["source_mtime_ns"] = src.stat().st_mtime_ns
    if entry.get("output"):
        entry["output"] = str(target.relative_to(result.out))
        result.written += 1
    result.per_file[rel] = entry


def _write_json(value: dict, path: Path) -> None:
    write_text_atomic(json.dumps(value, indent=2, ensure_ascii=False), path)


def _write_report(report: dict, out: Path, log: Callable[[str], None]) -> dict:
    """prepare_report.json and prepare_report.txt in OUT, the latter also logged; `report`."""
    _write_json(report, out / REPORT_JSON)
    text = format_report(report)
    write_text_atomic(text + "\n", out / REPORT_TXT)
    log(text)
    return report


def _check_outcome(raw: Path, result: PrepareResult, skip_bad: bool) -> None:
    """DatasetError for unreadable images (unless `skip_bad`) and when no image could be prepared."""
    unreadable = result.report["unreadable"]
    if unreadable and not skip_bad:
        raise DatasetError(
            format_problems([u["error"] for u in unreadable]) + "\nFix: delete or replace these "
            "files, or pass --skip-bad to leave them out (listed in "
            f"{result.out / REPORT_JSON})."
        )
    if not any(e["status"] != UNREADABLE and e["status"] != SKIPPED_MULTIPLE for e in result.per_file.values()):
        raise DatasetError(f"{raw}: no image could be prepared; see {result.out / REPORT_JSON}")


def _still_valid(entry: dict | None, src: Path, target: Path) -> bool:
    """A previous outcome can be kept: same source file, and its output (if it has one) still there
    and newer than the source. Unreadable files are always tried again."""
    if not entry or entry["status"] == UNREADABLE or entry.get("source_mtime_ns") != src.stat().st_mtime_ns:
        return False
    if entry["status"] == SKIPPED_MULTIPLE:
        return not target.exists()
    return target.is_file() and target.stat().st_mtime_ns >= src.stat().st_mtime_ns


def _prepare_one(src: Path, target: Path, detector, config, single_face_only: bool, fmt: str) -> dict:
    """Align one image into `target`; its report entry."""
    from facegender.core.faces.align import align_face, fallback_crop

    try:
        image = load_image(src)
    except ImageError as exc:
        target.unlink(missing_ok=True)
        return {"status": UNREADABLE, "error": str(exc)}
    faces = detector.detect(image)
    if len(faces) > 1 and single_face_only:
        target.unlink(missing_ok=True)
        return {"status": SKIPPED_MULTIPLE, "faces": len(faces)}
    if faces:
        status, crop = (MULTIPLE if len(faces) > 1 else OK), align_face(image, faces[0].landmarks, config)
    else:
        status, crop = NO_FACE, fallback_crop(image, config)
    _save(crop, target, fmt)
    return {"status": status, "faces": len(faces), "output": True}


def build_report(raw: Path, out: Path, settings: dict, result: PrepareResult, seconds: float) -> dict:
    files = result.per_file
    by_status = {
        s: sorted(k for k, v in files.items() if v["status"] == s)
        for s in (OK, NO_FACE, MULTIPLE, SKIPPED_MULTIPLE, UNREADABLE)
    }
    return {
        "source": str(raw),
        "out": str(out),
        **settings,
        "counts": {
            "images": len(files),
            "written": result.written,
            "reused": result.reused,
            **{s: len(v) for s, v in by_status.items()},
        },
        "no_face": by_status[NO_FACE],
        "multiple_faces": [{"file": k, "faces": files[k]["faces"]} for k in by_status[MULTIPLE]],
        "skipped_multiple_faces": [{"file": k, "faces": files[k]["faces"]} for k in by_status[SKIPPED_MULTIPLE]],
        "unreadable": [{"file": k, "error": files[k]["error"]} for k in by_status[UNREADABLE]],
        "seconds": round(seconds, 1),
        "files": files,
    }


def format_report(report: dict, limit: int = 20) -> str:
    """The report for people: counts, then the files of each kind (the first `limit` of each)."""
    c = report["counts"]
    lines = [
        f"prepared {c['images']} images from {report['source']} into {report['out']} "
        f"({c['written']} aligned now, {c['reused']} kept from before, {report['seconds']:.0f} s)",
        f"  one face: {c[OK]}   several faces (largest kept): {c[MULTIPLE]}   "
        f"several faces (left out, --single-face-only): {c[SKIPPED_MULTIPLE]}",
        f"  no face found (centred crop written, as in training): {c[NO_FACE]}   unreadable: {c[UNREADABLE]}",
    ]

    def section(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  - {s}" for s in items[:limit])
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more in {REPORT_JSON}")

    section("no face found", report["no_face"])
    section("several faces, largest kept", [f"{m['file']} ({m['faces']} faces)" for m in report["multiple_faces"]])
    section("several faces, left out", [f"{m['file']} ({m['faces']} faces)" for m in report["skipped_multiple_faces"]])
    section("unreadable", [u["error"] for u in report["unreadable"]])
    lines.append(
        f"train on it with: facegender train --data {report['out']}  (the face stage is recorded "
        "in the model; predict aligns faces in new photos the same way)"
    )
    return "\n".join(lines)
