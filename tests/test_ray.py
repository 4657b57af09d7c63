"""`facegender predict --ray` and `predict_ray`: on a local Ray instance (2 CPUs), over the 200 photos of
faces-dev/test, the results equal the local `predict`'s row by row; Parquet has the documented columns;
without Ray the command says which extra to install, and ray is imported only by a Ray run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, shared_path

from facegender.app.ray_predict import PARQUET_COLUMNS, _address_and_inputs, predict_ray, split_inputs
from facegender.core.errors import ConfigError

FOLDER = ("datasets", "faces-dev", "test")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'facegender[ray]')")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows():
    """The local command's results for faces-dev/test (`--fast`), as JSON data, in its order."""
    import facegender
    from facegender.core.model import FAST

    model = facegender.load(**FAST)
    return [r.to_dict() if hasattr(r, "to_dict") else r for r in model.predict([shared_path(*FOLDER)])]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_same(rows: list[dict], local: list[dict]) -> None:
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == len(local) == 200
    assert files == [r["file"] for r in local]  # same files, same order
    for got, want in zip(rows, local):
        assert got["status"] == want["status"] and len(got["faces"]) == len(want["faces"]), got["file"]
        for g, w in zip(got["faces"], want["faces"]):
            assert g["label"] == w["label"] and g["box"] == w["box"], got["file"]
            assert g["probability"] == pytest.approx(w["probability"], abs=1e-6)
            for name, p in w["probabilities"].items():
                assert g["probabilities"][name] == pytest.approx(p, abs=1e-6)
    assert rows == local  # and every other key (sizes, landmarks, scores) too


def test_predict_ray_equals_local_predict(ray_local, local_rows, tmp_path):
    folder = shared_path(*FOLDER)
    out = tmp_path / "ray.jsonl"
    counts = predict_ray(None, [str(folder)], str(out), workers=2, fast=True, quiet=True)
    assert counts["photos"] == 200 and counts["failed"] == 0 and counts["workers"] == 2
    _assert_same(_jsonl(out), local_rows)


def test_cli_predict_ray_writes_the_same_rows(ray_local, local_rows, tmp_path):
    from facegender.app.cli import main

    out = tmp_path / "cli.jsonl"
    rc = main(
        [
            "predict",
            "--ray",
            "--jsonl",
            "--fast",
            "--quiet",
            "--ray-workers",
            "2",
            "--out",
            str(out),
            str(shared_path(*FOLDER)),
        ]
    )
    assert rc == 0
    _assert_same(_jsonl(out), local_rows)
    local = tmp_path / "local.jsonl"
    assert main(["predict", "--jsonl", "--fast", "--quiet", "--out", str(local), str(shared_path(*FOLDER))]) == 0
    assert out.read_bytes() == local.read_bytes()  # the local command's file, byte for byte


def test_parquet_columns_and_a_missing_file(ray_local, local_rows, tmp_path):
    import pyarrow.parquet as pq

    from facegender.app.cli import main

    photos = [r["file"] for r in local_rows[:5]]
    missing = str(tmp_path / "gone.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    out = tmp_path / "r.parquet"
    rc = main(
        [
            "predict",
            "--ray",
            "--parquet",
            "--fast",
            "--quiet",
            "--ray-workers",
            "1",
            "--out",
            str(out),
            *photos,
            missing,
            str(tmp_path / "empty.jpg"),
        ]
    )
    assert rc == 1  # two files could not be read, as the local command says
    table = pq.read_table(out)
    assert tuple(table.column_names) == PARQUET_COLUMNS
    rows = {r["file"]: r for r in table.to_pylist()}
    assert len(rows) == 7
    for want in local_rows[:5]:
        got = rows[want["file"]]
        assert (got["status"], got["width"], got["height"], got["error"]) == (
            want["status"],
            want["width"],
            want["height"],
            None,
        )
        assert json.loads(got["faces"]) == want["faces"]
    import facegender
    from facegender.core.model import FAST

    local = {r.file: r.to_dict() for r in facegender.load(**FAST).predict([missing, str(tmp_path / "empty.jpg")])}
    for name, want in local.items():  # the same messages as the local command's, read by path
        assert (rows[name]["status"], rows[name]["error"], rows[name]["faces"]) == ("error", want["error"], "[]")
    assert main(["predict", "--ray", "--parquet", "--quiet", "--out", str(out), *photos]) == 3  # never overwritten


def test_inputs_are_local_or_one_file_system(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        split_inputs(["s3://bucket/photos", str(tmp_path)])
    with pytest.raises(ConfigError, match="one file system"):
        split_inputs(["s3://bucket/a", "gs://bucket/b"])
    assert split_inputs(["s3://bucket/a/"]) == (["s3://bucket/a/"], [], "s3://")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, missing, prefix = split_inputs([str(tmp_path), str(tmp_path / "gone.jpg")], done={str(tmp_path / "b.jpg")})
    assert (paths, missing, prefix) == ([str(tmp_path / "a.png")], [str(tmp_path / "gone.jpg")], "")


def test_ray_folder_is_an_input_not_an_address(tmp_path):
    """`--ray FOLDER`: argparse takes FOLDER for the address; an existing path is taken as an input."""
    args = argparse.Namespace(ray=str(tmp_path), images=["b.jpg"])
    assert _address_and_inputs(args) == ("auto", [str(tmp_path), "b.jpg"])
    args = argparse.Namespace(ray="ray://head:10001", images=[str(tmp_path)])
    assert _address_and_inputs(args) == ("ray://head:10001", [str(tmp_path)])


BLOCK_RAY = """
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoRay())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_without_ray_the_command_names_the_extra(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    out = tmp_path / "x.jsonl"
    proc = _run(
        BLOCK_RAY
        + f"""
from facegender.app.cli import main
sys.exit(main(["predict", "--ray", "--jsonl", "--out", {str(out)!r}, {str(tmp_path / "a.jpg")!r}]))
"""
    )
    assert not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 5, proc.stderr
    assert len(lines) == 1 and "pip install 'facegender[ray]'" in lines[0] and "Traceback" not in proc.stderr


def test_local_predict_does_not_import_ray():
    proc = _run("""
import sys
from facegender.app.cli import main
assert main(["predict", "--sample", "--jsonl", "--fast", "--quiet"]) == 0
assert not [m for m in sys.modules if m.split(".")[0] == "ray"], "ray was imported"
print("NO-RAY-OK")
""")
    assert proc.returncode == 0 and "NO-RAY-OK" in proc.stdout, proc.stderr
