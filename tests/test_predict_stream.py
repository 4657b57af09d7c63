"""`facegender predict` at scale: results written a photo at a time (JSON Lines, CSV, a JSON array),
`--out FILE` and `--resume` after a kill at any point, folders walked lazily.

The model is test_light's tiny ONNX colour classifier (no ../shared data, no PyTorch); the photos
are small synthetic images (conftest.make_image).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_light import colour_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD_CSV_COLUMNS = ["file", "face", "label", "probability", "uncertain", "x1", "y1", "x2", "y2", "status"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(model, folder of 150 small photos in 3 subfolders plus one unreadable file, their paths in
    input order)."""
    root = tmp_path_factory.mktemp("stream")
    model = colour_model(root / "colour.onnx")
    rng = np.random.default_rng(0)
    for i in range(150):
        make_image(root / "photos" / f"part{i % 3}" / f"p{i:03d}.jpg", i % 2, rng, size=24)
    (root / "photos" / "broken.jpg").write_bytes(b"not an image")
    paths = [str(p) for p in sorted((root / "photos").rglob("*.jpg"))]
    return model, root / "photos", paths


def predict(args: list[str], capsys) -> tuple[int, str, str]:
    from facegender.app.cli import main

    code = main(["predict", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jsonl_one_object_a_line_in_input_order(photos, capsys, tmp_path):
    model, folder, paths = photos
    code, out, err = predict(["--model", str(model), "--jsonl", "--quiet", str(folder)], capsys)
    assert code == 1 and "1 of 151 file(s) could not be read" in err  # broken.jpg, in its place
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == paths
    broken = next(r for r in records if r["file"].endswith("broken.jpg"))
    assert broken["status"] == "error" and "not a readable image" in broken["error"]
    assert all(r["faces"][0]["label"] in ("red", "blue") for r in records if r is not broken)
    assert predict(["--model", str(model), "--jsonl", "--out", str(tmp_path / "r.jsonl"), str(folder)], capsys)[0] == 1
    assert (tmp_path / "r.jsonl").read_text() == out


def test_json_is_the_old_all_at_end_array(photos, capsys, tmp_path):
    import facegender

    model, folder, paths = photos
    code, out, err = predict(["--model", str(model), "--json", str(folder)], capsys)
    old = (
        json.dumps([r.to_dict() for r in facegender.load(model).predict([folder])], indent=2, ensure_ascii=False) + "\n"
    )
    assert out == old  # the same bytes as the array printed at the end
    assert [r["file"] for r in json.loads(out)] == paths
    assert "predict:" in err  # the progress bar, on stderr
    assert (
        predict(["--model", str(model), "--json", "--quiet", "--out", str(tmp_path / "r.json"), str(folder)], capsys)[2]
        == "1 of 151 file(s) could not be read\n"
    )
    assert (tmp_path / "r.json").read_text() == old


def test_one_photo_has_no_progress_bar_and_does_not_import_tqdm(photos):
    """A single photo file: no bar on stderr and tqdm is not imported (its import is ~25 ms of the
    run); a folder gets the bar."""
    model, folder, paths = photos
    code = (
        "import sys; from facegender.app.cli import main; "
        f"main(['predict', '--model', {str(model)!r}, '--jsonl', sys.argv[1]]); "
        "print('tqdm' in sys.modules, file=sys.stderr)"
    )
    for target, bar in ((paths[0], False), (str(folder), True)):
        run = subprocess.run([sys.executable, "-c", code, target], capture_output=True, text=True, timeout=120)
        assert run.stdout.count("\n") == (1 if not bar else len(paths)), run.stderr
        assert ("predict:" in run.stderr) is bar and run.stderr.rstrip().endswith(str(bar)), run.stderr


def test_csv_has_the_old_columns(photos, capsys):
    model, folder, paths = photos
    code, out, _ = predict(["--model", str(model), "--csv", "--quiet", str(folder)], capsys)
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == OLD_CSV_COLUMNS and [row[0] for row in table[1:]] == paths
    broken = next(row for row in table if row[0].endswith("broken.jpg"))
    assert broken[1:9] == [""] * 8 and "not a readable image" in broken[9]
    assert all(row[1] == "1" and row[4] in ("true", "false") and row[9] == "ok" for row in table[1:] if row != broken)


def test_annotate_writes_each_copy(photos, capsys, tmp_path):
    model, folder, paths = photos
    code, _, err = predict(
        ["--model", str(model), "--jsonl", "--quiet", "--annotate", str(tmp_path / "a"), str(folder / "part0")], capsys
    )
    assert code == 0 and "annotated 50 image(s)" in err
    assert len(list((tmp_path / "a").iterdir())) == 50


def test_output_file_is_never_overwritten_silently(photos, capsys, tmp_path):
    model, folder, _ = photos
    out = tmp_path / "r.jsonl"
    out.write_text("")
    code, _, err = predict(["--model", str(model), "--jsonl", "--out", str(out), str(folder)], capsys)
    assert code == 3 and "--resume" in err and "delete it" in err
    code, _, err = predict(["--model", str(model), "--jsonl", "--resume", str(folder)], capsys)
    assert code == 3 and "--resume needs --out" in err
    code, _, err = predict(["--model", str(model), "--out", str(out), str(folder)], capsys)
    assert code == 3 and "--jsonl, --csv or --json" in err
    out.write_text("something else\n")
    code, _, err = predict(["--model", str(model), "--csv", "--resume", "--out", str(out), str(folder)], capsys)
    assert code == 3 and "cannot resume" in err and out.read_text() == "something else\n"


def test_a_folder_without_images_is_an_error(photos, capsys, tmp_path):
    model, folder, _ = photos
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, err = predict(["--model", str(model), "--jsonl", str(tmp_path / "empty")], capsys)
    assert code == 3 and "no images found in" in err
    code, out, err = predict(
        ["--model", str(model), "--jsonl", "--quiet", str(tmp_path / "empty"), str(folder / "part1")], capsys
    )
    assert code == 0 and "note: no images found in" in err and len(out.splitlines()) == 50


# ----------------------------------------------------------------------------- lazy walk


def test_folders_are_walked_lazily_in_the_old_order(tmp_path, monkeypatch):
    from facegender.core import images
    from facegender.core.images import expand_paths, is_image_name, iter_paths

    for rel in ("b.jpg", "a/x.png", "a/notes.txt", "a.b/y.jpg", "A/z.JPG", "c/d/e/f.webp", "c/g.gif", "_.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for i in range(30):
        (tmp_path / "many" / f"sub{i:02d}").mkdir(parents=True)
        (tmp_path / "many" / f"sub{i:02d}" / "p.jpg").write_bytes(b"x")
    old = sorted(f for f in tmp_path.rglob("*") if f.is_file() and is_image_name(f))
    assert list(iter_paths([tmp_path])) == expand_paths([tmp_path]) == old
    assert images.count_images([tmp_path, tmp_path / "b.jpg"]) == len(old) + 1

    listed = []
    real = os.scandir
    monkeypatch.setattr(images.os, "scandir", lambda path: listed.append(Path(path)) or real(path))
    walk = iter_paths([tmp_path / "many"])
    assert next(walk) == tmp_path / "many" / "sub00" / "p.jpg"
    assert listed == [tmp_path / "many", tmp_path / "many" / "sub00"]  # not the 29 other folders


def test_predict_iter_takes_a_one_shot_iterator(photos):
    import facegender

    model, folder, paths = photos

    class OneShot:  # no __len__, no __getitem__: only iteration
        def __init__(self, items):
            self.items = iter(items)

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.items)

    results = list(facegender.load(model).predict_iter(OneShot(Path(p) for p in paths[:40]), batch_size=8))
    assert [r.file for r in results] == paths[:40]


# ----------------------------------------------------------------------------- resume, every cut point


def _results() -> list[dict]:
    """Fake results: photos with 0, 1 and 3 faces, an error, non-ASCII and comma-and-quote names."""

    def face(x: float) -> dict:
        return {
            "box": [x, 1.0, x + 5, 9.5],
            "landmarks": None,
            "detection_score": None,
            "label": "wanita",
            "predicted_class": "wanita",
            "probability": 0.75,
            "probabilities": {"pria": 0.25, "wanita": 0.75},
            "uncertain": False,
        }

    return [
        {"file": "a/ü ñ.jpg", "width": 9, "height": 9, "faces": [face(1.0)], "status": "ok"},
        {"file": 'b/"x, y".png', "width": 9, "height": 9, "faces": [face(1.0), face(2.0), face(3.0)], "status": "ok"},
        {"file": "c.jpg", "error": "c.jpg: not a readable image", "status": "error", "faces": []},
        {"file": "d.jpg", "width": 9, "height": 9, "faces": [], "status": "no face found"},
        {"file": "e.jpg", "width": 9, "height": 9, "faces": [face(4.0), face(5.0)], "status": "ok"},
    ]


def _written(fmt: str, results: list[dict], stream=None, items: int = 0, header: bool = True) -> str:
    from facegender.app.output import ResultWriter

    stream = stream or io.StringIO()
    writer = ResultWriter(fmt, stream, items=items, header=header)
    for r in results:
        writer.write(r)
    writer.close()
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_resume_from_every_cut_point_gives_the_uninterrupted_file(fmt, tmp_path):
    """A file cut at any byte (a kill mid-write), resumed: what is kept is whole, nothing is lost,
    nothing doubled, and the result is byte for byte the uninterrupted run's file."""
    from facegender.app.output import open_results

    results = _results()
    full = _written(fmt, results).encode("utf-8")
    if fmt == "json":
        assert json.loads(full) == results
    path = tmp_path / f"out.{fmt}"
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        writer, kept = open_results(path, fmt, resume=True)
        assert kept.end <= cut and full.startswith(path.read_bytes())  # cut to whole records (+ header)
        with writer.stream:
            for r in results:
                if r["file"] not in kept.done:
                    writer.write(r)
            writer.close()
        assert path.read_bytes() == full, f"cut at byte {cut}"
    # a finished file: all done (CSV always does its last photo again), and it stays the same
    path.write_bytes(full)
    writer, kept = open_results(path, fmt, resume=True)
    writer.stream.close()
    assert kept.done == {r["file"] for r in results[: -1 if fmt == "csv" else None]}


def test_csv_resume_drops_the_last_photo_cut_between_its_rows(tmp_path):
    """Two of a photo's three face rows were written: whole lines, but not the whole photo."""
    from facegender.app.output import scan_csv

    full = _written("csv", _results()[:2]).encode()
    lines = full.splitlines(keepends=True)
    assert len(lines) == 5  # header, one face, three faces
    path = tmp_path / "out.csv"
    path.write_bytes(b"".join(lines[:4]))
    with open(path, "rb") as f:
        kept = scan_csv(path, f)
    assert kept.done == {"a/ü ñ.jpg"} and kept.end == len(b"".join(lines[:2]))


def test_resume_refuses_a_damaged_middle(tmp_path):
    from facegender.app.output import open_results

    path = tmp_path / "out.jsonl"
    path.write_text('{"file": "a.jpg"}\nnot json\n{"file": "b.jpg"}\n')
    with pytest.raises(ValueError, match="line 2"):
        open_results(path, "jsonl", resume=True)
    assert path.read_text().count("\n") == 3  # untouched


# ----------------------------------------------------------------------------- kill -9 and --resume

#: The child: `python -m facegender predict` with every record written in two halves and a pause
#: between them and after it, so that a SIGKILL lands inside records as well as between them.
SLOW_CHILD = textwrap.dedent("""
    import sys, time
    from facegender.app import output

    def put(self, text, _put=output.ResultWriter._put):
        half = len(text) // 2
        _put(self, text[:half]); time.sleep(0.01); _put(self, text[half:]); time.sleep(0.01)

    output.ResultWriter._put = put
    from facegender.app.cli import main
    sys.exit(main(["predict", *sys.argv[1:]]))
""")


def _run(args: list[str], cwd: Path, slow: bool = False):
    command = [sys.executable, "-c", SLOW_CHILD] if slow else [sys.executable, "-m", "facegender", "predict"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(command + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_written(proc, out: Path, records: int) -> None:
    """SIGKILL `proc` once `out` holds about `records` photos (polling its lines), after a random
    pause of up to two records, so that the kill lands inside a record about half of the time."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= records:
            break
        time.sleep(0.02)
    time.sleep(random.uniform(0, 0.04))
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _photos_in(fmt: str, out: Path) -> list[str]:
    text = out.read_text(encoding="utf-8")
    if fmt == "jsonl":
        return [json.loads(line)["file"] for line in text.splitlines()]
    if fmt == "json":
        return [r["file"] for r in json.loads(text)]
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == OLD_CSV_COLUMNS
    return [row[0] for row in rows[1:]]  # one face (or error) row per photo here


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_killed_run_resumes_with_every_photo_once(fmt, photos, tmp_path):
    model, folder, paths = photos
    out = tmp_path / f"results.{fmt}"
    args = ["--model", str(model), f"--{fmt}", "--out", str(out), "--batch-size", "4", str(folder)]
    first = _run(args, tmp_path, slow=True)
    _kill_when_written(first, out, records=40 if fmt != "json" else 40 * 20)  # a JSON item is ~20 lines
    cut = out.read_bytes()
    assert cut  # something was written (and the run was killed before it finished)
    if fmt == "jsonl" and cut.endswith(b"\n"):
        out.write_bytes(cut + b'{"file": "' + paths[-1].encode()[:20])  # a cut line, by hand
    again = _run(args + ["--resume"], tmp_path)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode in (0, 1), stderr  # 1 when broken.jpg was among this run's photos
    assert "photo(s) in it are skipped" in stderr
    done = _photos_in(fmt, out)
    assert sorted(done) == sorted(paths) and len(done) == len(set(done)) == 151
    assert done == paths  # and in input order: the kept photos were the first ones


def test_without_resume_the_killed_file_is_refused(photos, tmp_path):
    model, folder, _ = photos
    out = tmp_path / "results.jsonl"
    first = _run(["--model", str(model), "--jsonl", "--out", str(out), str(folder)], tmp_path, slow=True)
    _kill_when_written(first, out, records=5)
    before = out.read_bytes()
    again = _run(["--model", str(model), "--jsonl", "--out", str(out), str(folder)], tmp_path)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 3 and "exists: pass --resume" in stderr
    assert out.read_bytes() == before
