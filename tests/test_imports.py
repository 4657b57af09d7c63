"""Dataset importers, on tiny images made in tmp_path."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from PIL import Image

from facegender.data.importers import age_band, import_csv, import_utkface, parse_utkface_name


def _jpeg(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path, "JPEG")
    return path


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _read_groups(out: Path) -> list[dict[str, str]]:
    with open(out / "groups.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _utk(tmp_path: Path, n_male: int = 10, n_female: int = 5) -> Path:
    src = tmp_path / "UTKFace"
    for i in range(n_male):  # ages 10, 13, 16, ... ; races cycle 0..4
        _jpeg(src / f"{10 + 3 * i}_0_{i % 5}_2017010915055{i:04d}.jpg.chip.jpg", i * 10)
    for i in range(n_female):
        _jpeg(src / f"{20 + 9 * i}_1_{i % 5}_2017011015055{i:04d}.jpg", i * 20)
    return src


# ------------------------------------------------------------------------------------ UTKFace


def test_parse_utkface_name():
    assert parse_utkface_name("25_1_2_20170116174525125.jpg.chip.jpg") == {
        "age": 25,
        "gender": 1,
        "label": "female",
        "race": "Asian",
    }
    assert parse_utkface_name("61_0_4_20170109150557335.jpg")["race"] == "Others"
    for bad in ("39_1_20170116174525125.jpg.chip.jpg", "x_0_0_1.jpg", "30_2_0_1.jpg", "30_0_7_1.jpg", "notes.jpg"):
        with pytest.raises(ValueError):
            parse_utkface_name(bad)


def test_age_band():
    assert [age_band(a) for a in (0, 17, 18, 29, 30, 44, 45, 59, 60, 99)] == [
        "0-17",
        "0-17",
        "18-29",
        "18-29",
        "30-44",
        "30-44",
        "45-59",
        "45-59",
        "60+",
        "60+",
    ]


def test_import_utkface_layout_stratification_groups(tmp_path):
    src = _utk(tmp_path)
    _jpeg(src / "39_1_20170116174525125.jpg.chip.jpg")  # race missing: skipped
    _jpeg(src / "hello.jpg")  # not a UTK name: skipped
    (src / "README.txt").write_text("not an image")  # ignored
    out = tmp_path / "data"
    s = import_utkface(src, out, test_fraction=0.2, seed=1)

    # 10 male * 0.2 = 2 test, 5 female * 0.2 = 1 test (sklearn rounding, +-1 allowed)
    assert s["classes"] == ["female", "male"]
    assert abs(s["counts"]["test"]["male"] - 2) <= 1 and abs(s["counts"]["test"]["female"] - 1) <= 1
    assert s["counts"]["test"]["male"] + s["counts"]["train"]["male"] == 10
    assert s["counts"]["test"]["female"] + s["counts"]["train"]["female"] == 5
    assert all(s["counts"][split][c] >= 1 for split in ("train", "test") for c in s["classes"])
    assert s["n_images"] == 15 and s["n_train"] + s["n_test"] == 15
    assert s["n_skipped"] == 2
    assert {Path(x["path"]).name for x in s["skipped"]} == {"39_1_20170116174525125.jpg.chip.jpg", "hello.jpg"}
    assert all(x["reason"] for x in s["skipped"])
    assert s["ignored_non_images"] == 1

    files = _files(out)
    images = {f for f in files if f != "groups.csv"}
    assert "groups.csv" in files and len(images) == 15
    for f in images:
        split, label, name = f.split("/")
        assert split in ("train", "test") and label in ("male", "female")
        assert parse_utkface_name(name)["label"] == label
    # Counts on disk match the summary.
    for split in ("train", "test"):
        for c in ("male", "female"):
            assert len(list((out / split / c).iterdir())) == s["counts"][split][c]

    rows = _read_groups(out)
    assert list(rows[0]) == ["path", "label", "age", "age_band", "race"]
    assert {r["path"] for r in rows} == images  # exactly the files written
    for r in rows:
        info = parse_utkface_name(Path(r["path"]).name)
        assert r["label"] == info["label"] == r["path"].split("/")[1]
        assert int(r["age"]) == info["age"] and r["age_band"] == age_band(info["age"])
        assert r["race"] == info["race"]


def test_import_utkface_seed_reproducible(tmp_path):
    src = _utk(tmp_path, 12, 12)
    a = import_utkface(src, tmp_path / "a", seed=7)
    b = import_utkface(src, tmp_path / "b", seed=7)
    c = import_utkface(src, tmp_path / "c", seed=8)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _read_groups(tmp_path / "a") == _read_groups(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")  # 24 choose 5 splits: differs
    assert a["counts"] == b["counts"] == c["counts"]


def test_refuses_non_empty_out_unless_overwrite(tmp_path):
    src = _utk(tmp_path)
    out = tmp_path / "out"
    _jpeg(out / "train" / "male" / "stale.jpg")
    with pytest.raises(FileExistsError, match=str(out)):
        import_utkface(src, out)
    assert _files(out) == {"train/male/stale.jpg"}  # untouched
    s = import_utkface(src, out, overwrite=True)
    assert "train/male/stale.jpg" not in _files(out)  # replaced, not mixed
    assert len(_files(out)) == s["n_images"] + 1


def test_class_with_one_image_is_a_clear_error(tmp_path):
    src = _utk(tmp_path, n_male=6, n_female=1)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="female") as e:
        import_utkface(src, out)
    assert "at least 2" in str(e.value)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if "importing" in p.name]  # staging cleaned


def test_name_collisions_do_not_overwrite(tmp_path):
    src = tmp_path / "UTK"
    name = "30_0_0_20170101000000001.jpg"
    for part, shade in (("part1", 0), ("part2", 120), ("part3", 250)):
        _jpeg(src / part / name, shade)
    for i in range(3):
        _jpeg(src / f"30_1_0_2017010100000000{i}.jpg")
    out = tmp_path / "out"
    s = import_utkface(src, out, test_fraction=0.34, seed=0)
    male = [p for split in ("train", "test") for p in (out / split / "male").iterdir()]
    assert len(male) == 3
    # Three distinct pictures survived (different shades).
    shades = {Image.open(p).convert("L").getpixel((4, 4)) // 50 for p in male}
    assert len(shades) == 3
    # Names only need to be unique within a folder: one rename per extra copy in the same split.
    n_split_folders = sum(1 for sp in ("train", "test") if s["counts"][sp]["male"])
    assert len(s["renamed"]) == 3 - n_split_folders
    assert all(r["path"].endswith("_1.jpg") or r["path"].endswith("_2.jpg") for r in s["renamed"])
    assert {r["path"] for r in _read_groups(out)} == {x for x in _files(out) if x != "groups.csv"}


@pytest.mark.parametrize("link", ["hardlink", "symlink"])
def test_link_modes(tmp_path, link):
    src = _utk(tmp_path, 4, 4)
    out = tmp_path / "out"
    import_utkface(src, out, link=link, test_fraction=0.25)
    written = [p for p in (out / "train").rglob("*.jpg")]
    assert written
    for p in written:
        if link == "symlink":
            assert p.is_symlink() and p.resolve().parent == src.resolve()
        else:
            assert not p.is_symlink() and os.stat(p).st_nlink >= 2
        assert Image.open(p).size == (8, 8)


def test_bad_link_mode(tmp_path):
    with pytest.raises(ValueError, match="link"):
        import_utkface(_utk(tmp_path, 4, 4), tmp_path / "out", link="move")


# ---------------------------------------------------------------------------------------- CSV


def _csv_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    rows = [("path", "label", "skin", "source")]
    for i in range(6):
        _jpeg(root / "imgs" / f"a{i}.jpg", 10 * i)
        rows.append((f"imgs/a{i}.jpg", "женщина", "V" if i % 2 else "II", "web"))
    for i in range(4):
        _jpeg(root / "imgs" / "sub" / f"b{i}.jpg", 20 * i)
        rows.append((f"imgs\\sub\\b{i}.jpg", "man/boy", "III", ""))
    rows.append(("imgs/missing.jpg", "man/boy", "I", "web"))
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return root / "labels.csv"


def test_import_csv(tmp_path):
    labels = _csv_dataset(tmp_path)
    out = tmp_path / "out"
    s = import_csv(labels, out, test_fraction=0.25, seed=3)
    # Unicode label kept; "/" in a label becomes "_".
    assert s["classes"] == ["man_boy", "женщина"]
    # 6 * .25 = 1.5 -> 1 or 2 test; 4 * .25 = 1 test (+-1)
    assert abs(s["counts"]["test"]["женщина"] - 1.5) <= 1
    assert abs(s["counts"]["test"]["man_boy"] - 1) <= 1
    assert all(s["counts"][sp][c] >= 1 for sp in ("train", "test") for c in s["classes"])
    assert s["n_images"] == 10
    assert s["n_skipped"] == 1 and "not found" in s["skipped"][0]["reason"]
    assert s["skipped"][0]["row"] == 12  # header is line 1

    rows = _read_groups(out)
    assert list(rows[0]) == ["path", "label", "skin", "source"]
    assert {r["path"] for r in rows} == {x for x in _files(out) if x != "groups.csv"}
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["a1.jpg"]["skin"] == "V" and by_name["a0.jpg"]["skin"] == "II"
    assert by_name["b2.jpg"]["label"] == "man_boy" and by_name["b2.jpg"]["source"] == ""
    assert by_name["a3.jpg"]["path"].split("/")[1] == "женщина"


def test_import_csv_root_and_collisions(tmp_path):
    root = tmp_path / "photos"
    csv_path = tmp_path / "meta" / "labels.csv"
    csv_path.parent.mkdir()
    lines = ["path,label,age"]
    for cls in ("f", "m"):
        for folder in ("x", "y"):  # same file names in two folders
            for i in range(2):
                _jpeg(root / folder / f"{cls}{i}.jpg")
                lines.append(f"{folder}/{cls}{i}.jpg,{cls},{20 + i}")
    lines.append("x/f0.jpg,f,20")  # duplicate row: skipped
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = import_csv(csv_path, tmp_path / "out", root=root, test_fraction=0.5)
    assert s["n_images"] == 8 and s["n_skipped"] == 1 and "same file" in s["skipped"][0]["reason"]
    assert len([f for f in _files(tmp_path / "out") if f != "groups.csv"]) == 8


def test_import_csv_errors(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="path"):
        import_csv(bad, tmp_path / "out")
    one = tmp_path / "one.csv"
    _jpeg(tmp_path / "b.jpg")
    _jpeg(tmp_path / "c.jpg")
    one.write_text("path,label\na.jpg,x\nb.jpg,x\nc.jpg,y\n")
    with pytest.raises(ValueError, match="'y'.*at least 2"):
        import_csv(one, tmp_path / "out")
    clash = tmp_path / "clash.csv"
    clash.write_text("path,label\na.jpg,a/b\nb.jpg,a_b\n")
    with pytest.raises(ValueError, match="class folder"):
        import_csv(clash, tmp_path / "out")
