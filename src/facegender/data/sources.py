"""Training sources: several dataset folders combined without copying, and how often each is seen.

`facegender train --data A --data B ...` trains on every source; `--data sources.yaml` names them
in a file, with settings per source:

    sources:
      - path: datasets/faces-gdf           # relative to the file's folder
      - path: datasets/aaf-adult
        weight: 0.5                        # sampled half as often, image for image
        cap: 3000                          # at most 3000 training images per class (seeded choice)
        licence: research use; cite Cheng et al. 2019
      - path: datasets/imfdb-capped
        split_column: actor                # validation split by person (a manifest.csv column)

A source is a dataset folder with train/<class>/ (and test/<class>/, its test images), or a folder
of class folders, all of them training images. Every source has the same classes. A source may
hold `manifest.csv` (a `file` column relative to the source, and other columns such as age or
person), which `--balance group --balance-column COL` and `split_column` read, and `SOURCE.md`,
whose "Terms" section is recorded as the source's licence note when the entry gives none.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facegender.core.errors import ConfigError
from facegender.data.dataset import DatasetError, Split, find_classes, format_problems, scan_dataset, scan_split

MANIFEST = "manifest.csv"
SOURCE_NOTE = "SOURCE.md"


@dataclass
class Source:
    path: str
    name: str = ""
    weight: float = 1.0
    cap: int | None = None  # at most this many training images per class
    licence: str | None = None
    split_column: str | None = None  # manifest column naming the person: validation split by it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_sources(entries: Sequence[str]) -> list[Source]:
    """The sources of `--data` entries: folders, or .yaml files listing sources."""
    if not entries:
        raise DatasetError("no training data: pass --data DATASET (repeat it to combine sources)")
    sources: list[Source] = []
    for entry in entries:
        if str(entry).lower().endswith((".yaml", ".yml")):
            sources += _read_sources_file(Path(entry))
        else:
            sources.append(Source(path=str(entry)))
    names = Counter()
    for s in sources:
        base = s.name or Path(s.path).name or str(s.path)
        names[base] += 1
        s.name = base if names[base] == 1 else f"{base}-{names[base]}"
        if s.licence is None:
            s.licence = licence_note(Path(s.path))
    return sources


def _read_sources_file(path: Path) -> list[Source]:
    import yaml

    if not path.is_file():
        raise DatasetError(f"{path}: sources file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not a readable YAML file ({exc})") from None
    items = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise DatasetError(f"{path}: needs a 'sources:' list of entries with a 'path' (see docs/recipes.md)")
    known = set(Source.__dataclass_fields__)
    out = []
    for i, item in enumerate(items, 1):
        item = {"path": item} if isinstance(item, str) else item
        unknown = sorted(set(item) - known) if isinstance(item, dict) else []
        if not isinstance(item, dict) or "path" not in item or unknown:
            raise DatasetError(
                f"{path}: entry {i} needs a 'path'"
                + (f"; unknown keys {unknown} (known: {', '.join(sorted(known))})" if unknown else "")
            )
        entry = Source(**item)
        entry.path = str((path.parent / entry.path) if not os.path.isabs(entry.path) else entry.path)
        out.append(entry)
    return out


def licence_note(root: Path) -> str:
    """The first paragraph of the "Terms"/"Licence" section of the source's SOURCE.md, else 'not stated'."""
    note = root / SOURCE_NOTE
    if not note.is_file():
        return "not stated"
    lines, inside = [], False
    for line in note.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#"):
            if inside:
                break
            inside = any(word in line.lower() for word in ("terms", "licence", "license"))
        elif inside:
            if not line.strip() and lines:
                break
            if line.strip():
                lines.append(line.strip())
    return " ".join(lines) or "not stated"


# ----------------------------------------------------------------------------- scanning


@dataclass
class ScannedSources:
    classes: list[str]
    sources: list[Source]
    train: Split  # every source's training images, tagged with the source index
    test: Split | None  # the test/ images of the sources that have one


def scan_sources(sources: list[Source], seed: int = 0, need_test: bool = True) -> ScannedSources:
    """Classes and splits of every source (the same checks as one dataset); caps applied."""
    trains, tests, classes_of, problems = [], [], {}, []
    for s in sources:
        try:
            classes, train, test = _scan_one(Path(s.path), need_test and len(sources) == 1)
        except DatasetError as exc:
            problems.append(f"source {s.name}: {exc}")
            continue
        classes_of[s.name] = classes
        trains.append(_capped(train, s.cap, seed))
        tests.append(test or Split())
    if problems:
        raise DatasetError("\n".join(problems))
    first = next(iter(classes_of.values()))
    differ = {n: c for n, c in classes_of.items() if c != first}
    if differ:
        raise DatasetError(
            format_problems(
                [
                    f"source {n} has classes {c}, not {first}; every source needs the same class folders"
                    for n, c in differ.items()
                ]
            )
        )
    test = Split.concat(tests)
    if need_test and len(test) == 0:
        raise DatasetError(
            "no test images: at least one source needs a test/ folder with the class folders "
            "(it is used once, at the end, for the final accuracy)"
        )
    return ScannedSources(first, sources, Split.concat(trains), test if len(test) else None)


def _scan_one(root: Path, need_test: bool) -> tuple[list[str], Split, Split | None]:
    if (root / "train").is_dir() or not root.is_dir():
        return scan_dataset(root, need_test=need_test)
    classes = find_classes(root)  # a folder of class folders: all training images
    if len(classes) < 2:
        raise DatasetError(f"{root}: needs train/<class>/ or at least two class folders, found {classes or 'none'}")
    train, problems = scan_split(root, classes)
    if problems:
        raise DatasetError(format_problems(problems))
    return classes, train, None


def _capped(split: Split, cap: int | None, seed: int) -> Split:
    """At most `cap` images per class, a seeded choice (in the original order)."""
    if not cap:
        return split
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in sorted(set(split.labels)):
        idx = [i for i, y in enumerate(split.labels) if y == label]
        keep += idx if len(idx) <= cap else rng.choice(idx, cap, replace=False).tolist()
    return split.subset(sorted(keep))


# ----------------------------------------------------------------------------- manifests


def manifest_column(sources: list[Source], split: Split, column: str) -> list[str | None]:
    """The `column` value of each image of `split` from its source's manifest.csv (None where the
    source has no such manifest, column or row); column 'source' is the source's name."""
    if column == "source":
        return [sources[split.source_of(i)].name for i in range(len(split))]
    tables = {k: _manifest(Path(s.path), column) for k, s in enumerate(sources)}
    out = []
    for i, path in enumerate(split.paths):
        k = split.source_of(i)
        table = tables[k]
        out.append(table.get(_relative(path, Path(sources[k].path))) if table else None)
    return out


def _manifest(root: Path, column: str) -> dict[str, str] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "file" not in (reader.fieldnames or []) or column not in reader.fieldnames:
            return None
        return {row["file"]: row[column] for row in reader}


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def split_groups(sources: list[Source], split: Split) -> list[str | None] | None:
    """The person of each image for the validation split (sources with a split_column), or None."""
    if not any(s.split_column for s in sources):
        return None
    out: list[str | None] = [None] * len(split)
    for k, s in enumerate(sources):
        if not s.split_column:
            continue
        values = manifest_column(sources, split, s.split_column)
        missing = [split.paths[i] for i in range(len(split)) if split.source_of(i) == k and not values[i]]
        if missing:
            raise DatasetError(
                f"source {s.name}: split_column {s.split_column!r} has no value for {len(missing)} "
                f"image(s), e.g. {missing[0]}; add them to {Path(s.path) / MANIFEST}"
            )
        for i in range(len(split)):
            if split.source_of(i) == k:
                out[i] = f"{k}:{values[i]}"
    return out


# ----------------------------------------------------------------------------- sampling


def sample_weights(
    sources: list[Source], split: Split, balance: str = "none", column: str | None = None
) -> np.ndarray | None:
    """Per-image sampling weights (summing to the number of images), or None when every image is
    seen once an epoch (no balancing, every source weight 1).

    none: the source's weight. class: each class equally often. source: each (source, class) cell
    equally often. group: each (class, `column` value) cell equally often (images without a value
    form one cell per class). The source's weight multiplies each image's weight in every mode."""
    n = len(split)
    source_weight = np.array([sources[split.source_of(i)].weight for i in range(n)], dtype=np.float64)
    if balance == "none" and np.all(source_weight == 1.0):
        return None
    if balance == "none":
        cells = [0] * n
    elif balance == "class":
        cells = list(split.labels)
    elif balance == "source":
        cells = [(split.source_of(i), split.labels[i]) for i in range(n)]
    elif balance == "group":
        values = manifest_column(sources, split, column or "source")
        cells = [(split.labels[i], values[i] or "") for i in range(n)]
    else:
        raise ConfigError(f"unknown --balance {balance!r}")
    size = Counter(cells)
    w = source_weight / np.array([size[c] for c in cells], dtype=np.float64)
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise DatasetError("every source weight is 0: nothing to sample")
    return w * (n / w.sum())


def describe_sources(scanned: ScannedSources, parts: dict[str, Split]) -> list[dict[str, Any]]:
    """What the run records of each source: its settings, licence note and image counts per split."""
    out = []
    for k, s in enumerate(scanned.sources):
        counts = {
            name: {
                c: sum(1 for i in range(len(part)) if part.source_of(i) == k and part.labels[i] == j)
                for j, c in enumerate(scanned.classes)
            }
            for name, part in parts.items()
            if part is not None
        }
        out.append({**s.to_dict(), "path": str(Path(s.path).resolve()), "counts": counts})
    return out
