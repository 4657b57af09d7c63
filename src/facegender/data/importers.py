"""Importers that turn a downloaded data set into the layout the tool trains on.

Layout written (``OUT`` is the output folder)::

    OUT/train/<class>/<image>
    OUT/test/<class>/<image>
    OUT/groups.csv          path,label,<group columns...>   (path relative to OUT, "/"-separated)

Two sources are supported:

* :func:`import_utkface` - a folder of UTKFace images named ``age_gender_race_datetime.jpg``
  (optionally ``.jpg.chip.jpg``), gender 0 = male, 1 = female, race 0-4 = White, Black, Asian,
  Indian, Others.
* :func:`import_csv` - any CSV with ``path,label`` columns plus optional group columns.

Both split each class with a seeded, stratified ``train_test_split``, never overwrite one image
with another of the same name, skip (and report) unusable entries instead of crashing, and build
the result in a staging folder next to ``OUT`` that is moved into place only when complete.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import unicodedata
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

from facegender.core.errors import ConfigError, InputFileError, InputNotFoundError, OutputExistsError
from facegender.core.images import is_image_name

__all__ = ["UTK_GENDERS", "UTK_RACES", "age_band", "parse_utkface_name", "import_utkface", "import_csv"]

UTK_GENDERS = ("male", "female")
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
LINK_MODES = ("copy", "hardlink", "symlink")
SPLITS = ("train", "test")

_UTK_RE = re.compile(
    r"^(?P<age>\d+)_(?P<gender>\d+)_(?P<race>\d+)_[^_]+?\.(?:jpe?g|png)(?:\.chip\.jpg)?$", re.IGNORECASE
)


@dataclass
class _Item:
    """One image to import: where it is, its class and its group values."""

    source: Path
    label: str
    groups: dict[str, str] = field(default_factory=dict)


def age_band(age: int) -> str:
    """Age band used in ``groups.csv``: ``0-17``, ``18-29``, ``30-44``, ``45-59`` or ``60+``."""
    if age < 18:
        return "0-17"
    if age < 30:
        return "18-29"
    if age < 45:
        return "30-44"
    if age < 60:
        return "45-59"
    return "60+"


def parse_utkface_name(name: str) -> dict[str, Any]:
    """Parse a UTKFace file name into ``{age, gender, label, race}``.

    Accepts ``age_gender_race_datetime.jpg`` and ``....jpg.chip.jpg``. Raises ``ValueError`` with
    the reason when the name does not follow that pattern (several UTKFace files lack a field).
    """
    m = _UTK_RE.match(name)
    if not m:
        raise ValueError("name is not age_gender_race_datetime.jpg")
    age, gender, race = int(m["age"]), int(m["gender"]), int(m["race"])
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 (male) or 1 (female)")
    if not 0 <= race < len(UTK_RACES):
        raise ValueError(f"race {race} is not in 0-4")
    if age > 130:
        raise ValueError(f"age {age} is not plausible")
    return {"age": age, "gender": gender, "label": UTK_GENDERS[gender], "race": UTK_RACES[race]}


# --------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]')


def _class_folder_name(label: str) -> str:
    """A class label as a folder name: NFC-normalised, separators and characters Windows
    forbids replaced by ``_``; letters of any language are kept. Raises on an empty result."""
    name = unicodedata.normalize("NFC", str(label)).strip()
    name = _UNSAFE.sub("_", name).strip().rstrip(".")
    if not name or set(name) <= {"."}:
        raise ValueError(f"label {label!r} cannot be used as a folder name")
    return name


def _is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` (its location, not what a symlink there points to) is inside ``folder``."""
    try:
        (path.parent.resolve() / path.name).relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _in_output(path: Path, out: Path) -> bool:
    """Whether ``path`` lies in a part of ``out`` that an import writes (and may replace)."""
    return any(_is_within(path, out / split) for split in SPLITS) or _is_within(path, out / "groups.csv")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} is not empty; choose an empty folder or pass overwrite=True "
            f"(which replaces {out}/train, {out}/test and {out}/groups.csv)"
        )


def _split(items: list[_Item], test_fraction: float, seed: int) -> tuple[list[_Item], list[_Item]]:
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    counts = Counter(it.label for it in items)
    if len(counts) < 2:
        found = ", ".join(f"{k!r} ({v})" for k, v in counts.items()) or "none"
        raise InputFileError(f"need images of at least 2 classes to train a classifier; found {found}")
    small = sorted(k for k, v in counts.items() if v < 2)
    if small:
        detail = ", ".join(f"{k!r} has {counts[k]} image" for k in small)
        raise InputFileError(
            f"class {detail}: a stratified train/test split needs at least 2 images per class "
            f"(one for each split). Add more images of that class or remove it from the input."
        )
    labels = [it.label for it in items]
    try:
        train, test = train_test_split(items, test_size=test_fraction, random_state=seed, stratify=labels)
    except ValueError as e:  # e.g. the test split is smaller than the number of classes
        raise InputFileError(
            f"cannot split {len(items)} images of {len(counts)} classes with "
            f"test_fraction={test_fraction}: {e}. Use a test_fraction that gives every class at "
            f"least one test and one training image, or add images."
        ) from e
    return train, test


def _place(src: Path, dst: Path, link: str) -> bool:
    """Put ``src`` at ``dst``; returns True when a hard link had to fall back to a copy."""
    if link == "copy":
        shutil.copy2(src, dst)
    elif link == "symlink":
        os.symlink(src.resolve(), dst)
    else:
        try:
            os.link(src, dst)
        except OSError:  # across devices, or a file system without hard links
            shutil.copy2(src, dst)
            return True
    return False


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``stem_1.ext``, ``stem_2.ext``... if taken (compared case-insensitively, so
    the layout also works on case-insensitive file systems)."""
    if name.lower() not in taken:
        return name
    dot = name.find(".", 1)
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    i = 1
    while f"{stem}_{i}{ext}".lower() in taken:
        i += 1
    return f"{stem}_{i}{ext}"


@dataclass
class _Placed:
    """What placing the images in the staging folder did: the rows of ``groups.csv``, the files
    renamed to avoid a collision, hard links that fell back to copies, and images per split and class."""

    rows: list[dict[str, str]] = field(default_factory=list)
    renamed: list[dict[str, str]] = field(default_factory=list)
    fallbacks: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})


def _write_dataset(
    items: list[_Item],
    out: Path,
    *,
    test_fraction: float,
    seed: int,
    link: str,
    overwrite: bool,
    group_columns: Sequence[str],
    skipped: list[dict[str, str]],
    source: str,
) -> dict[str, Any]:
    """Split ``items`` and write the layout into ``out`` (see the module docstring): built in a
    staging folder next to ``out``, moved into place only when complete. The import's summary."""
    _check_import(items, out, link, overwrite)
    # Deterministic order before the seeded split, whatever order the file system lists.
    items = sorted(items, key=lambda it: (it.label, str(it.source)))
    train, test = _split(items, test_fraction, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        placed = _place_items(staging, (train, test), link, group_columns)
        _write_groups_csv(staging / "groups.csv", placed.rows, group_columns)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    classes = sorted({it.label for it in items})
    return {
        "source": source,
        "out": str(out),
        "train_dir": str(out / "train"),
        "test_dir": str(out / "test"),
        "groups_csv": str(out / "groups.csv"),
        "classes": classes,
        "counts": {s: {c: placed.counts[s].get(c, 0) for c in classes} for s in SPLITS},
        "n_images": len(items),
        "n_train": len(train),
        "n_test": len(test),
        "test_fraction": test_fraction,
        "seed": seed,
        "link": link,
        "hardlink_fallback_copies": placed.fallbacks,
        "renamed": placed.renamed,
        "skipped": skipped,
        "n_skipped": len(skipped),
    }


def _check_import(items: list[_Item], out: Path, link: str, overwrite: bool) -> None:
    """Refuse an unknown link mode, an output that may not be replaced, and sources inside the
    parts of ``out`` the import replaces."""
    if link not in LINK_MODES:
        raise ConfigError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    _check_out(out, overwrite)
    inside = [str(it.source) for it in items if _in_output(it.source, out)]
    if inside:
        raise ConfigError(
            f"{len(inside)} source image(s) are inside {out}/train or {out}/test, which the import "
            f"replaces (e.g. {inside[0]}); choose another output folder"
        )


def _place_items(
    staging: Path, splits: tuple[list[_Item], list[_Item]], link: str, group_columns: Sequence[str]
) -> _Placed:
    """Put the images of each split at ``staging/<split>/<class>/<name>``, names made unique per folder."""
    placed = _Placed()
    taken: dict[Path, set[str]] = {}
    for split, split_items in zip(SPLITS, splits):
        for it in split_items:
            rel_dir = Path(split) / it.label
            folder = staging / rel_dir
            if rel_dir not in taken:
                folder.mkdir(parents=True, exist_ok=True)
                taken[rel_dir] = set()
            name = _unique_name(it.source.name, taken[rel_dir])
            taken[rel_dir].add(name.lower())
            if name != it.source.name:
                placed.renamed.append({"source": str(it.source), "path": f"{split}/{it.label}/{name}"})
            placed.fallbacks += _place(it.source, folder / name, link)
            placed.counts[split][it.label] = placed.counts[split].get(it.label, 0) + 1
            placed.rows.append(
                {
                    "path": f"{split}/{it.label}/{name}",
                    "label": it.label,
                    **{c: it.groups.get(c, "") for c in group_columns},
                }
            )
    return placed


def _write_groups_csv(path: Path, rows: list[dict[str, str]], group_columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", *group_columns])
        writer.writeheader()
        writer.writerows(rows)


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out``'s train/, test/ and groups.csv with the finished ones from ``staging``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (*SPLITS, "groups.csv"):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging / name, target)


# --------------------------------------------------------------------------------------------
# UTKFace
# --------------------------------------------------------------------------------------------


def import_utkface(
    src: Path, out: Path, test_fraction: float = 0.2, seed: int = 42, link: str = "copy", overwrite: bool = False
) -> dict[str, Any]:
    """Import a UTKFace folder (searched recursively, e.g. ``UTKFace/`` or ``part1..3/``).

    Classes are ``male`` and ``female``; ``groups.csv`` has ``path,label,age,age_band,race``.
    Image files whose names do not parse, and empty files, are skipped and listed in
    ``summary["skipped"]`` as ``{path, reason}``; non-image files are ignored (counted in
    ``summary["ignored_non_images"]``).

    Returns the summary dict: ``out``, ``train_dir``, ``test_dir``, ``groups_csv``, ``classes``,
    ``counts`` (``{"train": {class: n}, "test": {class: n}}``), ``n_images``, ``n_train``,
    ``n_test``, ``renamed`` (name collisions resolved), ``skipped``, ``n_skipped``, and the
    settings used. Raises ``FileExistsError`` if ``out`` is not empty and ``overwrite`` is False,
    ``ValueError`` if a class has fewer than 2 images.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InputNotFoundError(f"UTKFace folder {src} does not exist or is not a folder")
    items: list[_Item] = []
    skipped: list[dict[str, str]] = []
    ignored = 0
    for path in sorted(src.rglob("*")):
        # Skip an earlier import's output when OUT is inside the source folder.
        if not path.is_file() or (out.exists() and _in_output(path, out)):
            continue
        if not is_image_name(path.name):
            ignored += 1
            continue
        try:
            info = parse_utkface_name(path.name)
        except ValueError as e:
            skipped.append({"path": str(path), "reason": str(e)})
            continue
        if path.stat().st_size == 0:
            skipped.append({"path": str(path), "reason": "empty file"})
            continue
        items.append(
            _Item(
                path, info["label"], {"age": str(info["age"]), "age_band": age_band(info["age"]), "race": info["race"]}
            )
        )
    if not items:
        raise InputFileError(
            f"no UTKFace images (age_gender_race_datetime.jpg) found under {src}"
            + (f"; {len(skipped)} image names did not parse" if skipped else "")
        )
    summary = _write_dataset(
        items,
        out,
        test_fraction=test_fraction,
        seed=seed,
        link=link,
        overwrite=overwrite,
        group_columns=("age", "age_band", "race"),
        skipped=skipped,
        source=str(src),
    )
    summary["ignored_non_images"] = ignored
    return summary


# --------------------------------------------------------------------------------------------
# generic CSV
# --------------------------------------------------------------------------------------------


@dataclass
class _LabelsTable:
    """A labels CSV as read: its header, the positions of ``path``, ``label`` and the group
    columns, and its rows with their line numbers."""

    header: list[str]
    i_path: int
    i_label: int
    extra: list[tuple[int, str]]
    rows: list[tuple[int, list[str]]]


def import_csv(
    labels_csv: Path,
    out: Path,
    test_fraction: float = 0.2,
    seed: int = 42,
    root: Path | None = None,
    link: str = "copy",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Import images listed in a CSV with columns ``path,label`` and optional group columns.

    ``path`` is relative to the CSV's folder (or to ``root``) unless absolute; Windows ``\\``
    separators are accepted. Labels become class folder names (path separators and characters
    Windows forbids become ``_``; other characters, of any script, are kept). Extra columns are
    copied to ``groups.csv`` (``path,label,<extra...>``). Rows whose file is missing, is not an
    image, is empty, has an empty label, or repeat an earlier path are skipped and listed in
    ``summary["skipped"]`` as ``{row, path, reason}`` (``row`` is the CSV line number).

    Returns the same summary as :func:`import_utkface`. Raises ``ValueError`` when the CSV lacks
    the ``path`` or ``label`` column, when two different labels map to the same folder name, or
    when a class has fewer than 2 images.
    """
    labels_csv, out = Path(labels_csv), Path(out)
    base = Path(root) if root is not None else labels_csv.parent
    if not labels_csv.is_file():
        raise InputNotFoundError(f"{labels_csv}: labels file not found; pass a CSV with path and label columns")
    table = _read_labels_csv(labels_csv)
    items, skipped = _csv_items(table, base, labels_csv)
    if not items:
        raise InputFileError(
            f"no usable images listed in {labels_csv}"
            + (f" ({len(skipped)} rows skipped, first: {skipped[0]['reason']})" if skipped else "")
        )
    return _write_dataset(
        items,
        out,
        test_fraction=test_fraction,
        seed=seed,
        link=link,
        overwrite=overwrite,
        group_columns=[h for _, h in table.extra],
        skipped=skipped,
        source=str(labels_csv),
    )


def _read_labels_csv(labels_csv: Path) -> _LabelsTable:
    """The CSV's header (which must name ``path`` and ``label``, in any case) and rows."""
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise InputFileError(f"{labels_csv} is empty; expected a header row path,label") from None
        lower = [h.lower() for h in header]
        missing = [c for c in ("path", "label") if c not in lower]
        if missing:
            raise InputFileError(f"{labels_csv} has no {' or '.join(missing)} column (columns: {', '.join(header)})")
        i_path, i_label = lower.index("path"), lower.index("label")
        extra = [(i, h) for i, h in enumerate(header) if i not in (i_path, i_label) and h]
        return _LabelsTable(header, i_path, i_label, extra, [(reader.line_num, r) for r in reader])


def _csv_items(table: _LabelsTable, base: Path, labels_csv: Path) -> tuple[list[_Item], list[dict[str, Any]]]:
    """(the images to import, the rows skipped as ``{row, path, reason}``); blank lines are ignored."""
    items: list[_Item] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[Path, int] = {}
    folder_of: dict[str, str] = {}
    for line, r in table.rows:
        if not any(cell.strip() for cell in r):
            continue  # blank line
        r = r + [""] * (len(table.header) - len(r))
        item = _csv_item(r, table, base, seen)
        if isinstance(item, str):
            skipped.append({"row": line, "path": r[table.i_path].strip(), "reason": item})
            continue
        _check_label_folder(folder_of, item.label, r[table.i_label].strip(), labels_csv)
        seen[item.source.resolve()] = line
        items.append(item)
    return items, skipped


def _csv_item(r: list[str], table: _LabelsTable, base: Path, seen: dict[Path, int]) -> _Item | str:
    """The image of one CSV row, or why the row is skipped (empty path, file missing, not an image,
    empty, listed before in ``seen``, label unusable as a folder name)."""
    raw_path, raw_label = r[table.i_path].strip(), r[table.i_label].strip()
    if not raw_path:
        return "empty path"
    p = Path(raw_path)
    path = p if p.is_absolute() else base / p
    if not path.exists() and "\\" in raw_path:
        path = base / Path(*raw_path.split("\\"))
    if not path.is_file():
        return f"file not found: {path}"
    if not is_image_name(path.name):
        return "not an image file name"
    if path.stat().st_size == 0:
        return "empty file"
    key = path.resolve()
    if key in seen:
        return f"same file as row {seen[key]}"
    try:
        folder = _class_folder_name(raw_label)
    except ValueError as e:
        return str(e)
    return _Item(path, folder, {h: r[i].strip() for i, h in table.extra})


def _check_label_folder(folder_of: dict[str, str], folder: str, raw_label: str, labels_csv: Path) -> None:
    """Refuse two labels that become the same class folder; ``folder_of`` records each folder's first label."""
    # Compared case-insensitively: "Male" and "male" would share a folder on macOS/Windows.
    first = folder_of.setdefault(folder.casefold(), raw_label)
    if first != raw_label:
        raise InputFileError(
            f"labels {first!r} and {raw_label!r} both become the class folder {folder!r} "
            f"(folder names are compared ignoring case); make them identical or distinct "
            f"in {labels_csv}"
        )
