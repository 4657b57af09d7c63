"""Datasets: scanning a folder tree, checking every file before training, caching decoded images.

Layout: DATASET/train/<class>/*.jpg and DATASET/test/<class>/*.jpg; class names are folder names
(any language), sorted, and must be the same in train and test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from facegender.core.cache import cache_folder, cache_key, store
from facegender.core.errors import ConfigError, DataError
from facegender.core.files import sha256_file
from facegender.core.images import ImageError, is_image_name, load_image
from facegender.core.preprocessing import ImagePreparer, Preprocessing

#: Files that operating systems leave in folders; ignored without a word.
IGNORED_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class DatasetError(DataError, ValueError):
    """The dataset cannot be used as it is; the message lists every problem and the fix."""


@dataclass
class Split:
    """Image paths and integer labels of one split (train, val or test), and the index of the
    training source (sources.Source) each image comes from (empty: all from one source)."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def source_of(self, i: int) -> int:
        return self.sources[i] if self.sources else 0

    def subset(self, indices: Sequence[int]) -> Split:
        return Split(
            [self.paths[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.sources[i] for i in indices] if self.sources else [],
        )

    @classmethod
    def concat(cls, parts: Sequence[Split]) -> Split:
        """One split of several sources' splits, part k tagged as source k."""
        out = cls()
        for k, part in enumerate(parts):
            out.paths += part.paths
            out.labels += part.labels
            out.sources += [k] * len(part)
        return out

    def counts(self, classes: list[str]) -> dict[str, int]:
        return {c: self.labels.count(i) for i, c in enumerate(classes)}


def find_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(split_dir: Path, classes: list[str]) -> tuple[Split, list[str]]:
    """Every image file under split_dir/<class>/ (recursively); problems found on the way."""
    split, problems = Split(), []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.name not in IGNORED_FILES and not p.name.startswith("._")
        )
        images = [p for p in files if is_image_name(p)]
        for p in files:
            if not is_image_name(p):
                problems.append(f"{p}: not an image file (by its name); move it out of the dataset")
        if not images:
            problems.append(f"{class_dir}: class folder has no images; add images or remove the folder")
        split.paths += images
        split.labels += [label] * len(images)
    return split, problems


def scan_dataset(root: str | os.PathLike, need_test: bool = True) -> tuple[list[str], Split, Split | None]:
    """Classes, train split and test split of a dataset root, or DatasetError listing every problem.

    Only the folder structure is checked here; unreadable images are found by `load_split`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; pass --data DATASET with DATASET/train/<class>/")
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        found = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "nothing"
        raise DatasetError(
            f"{train_dir}: missing. The dataset needs {root}/train/<class>/ and "
            f"{root}/test/<class>/ (one folder per class); found: {found}"
        )
    classes = find_classes(train_dir)
    problems = []
    if len(classes) < 2:
        problems.append(f"{train_dir}: needs at least two class folders, found {classes or 'none'}")
    test = None
    if test_dir.is_dir():
        test_classes = find_classes(test_dir)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            problems.append(
                f"class folders differ between train/ and test/: only in train: {only_train or '-'}, "
                f"only in test: {only_test or '-'}; rename them so both have the same names"
            )
    elif need_test:
        problems.append(
            f"{test_dir}: missing; create it with the same class folders as train/ "
            "(it is used once, at the end, for the final accuracy)"
        )
    train, train_problems = scan_split(train_dir, classes)
    problems += train_problems
    if test_dir.is_dir() and not problems:
        test, test_problems = scan_split(test_dir, classes)
        problems += test_problems
    if problems:
        raise DatasetError(format_problems(problems))
    return classes, train, test


def format_problems(problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{len(problems)} problem(s) with the dataset:\n{lines}"


def split_train_val(
    train: Split, val_fraction: float, seed: int, groups: Sequence[str | None] | None = None
) -> tuple[Split, Split]:
    """Seeded validation split carved from the training images: stratified by class within each
    source, so every source is validated in its own proportion. Where `groups` names the person of
    an image (a source's `split_column`), a person's images all go to one side."""
    if val_fraction <= 0:
        return train, Split()
    val: list[int] = []
    for source in sorted(set(train.sources or [0])):
        idx = [i for i in range(len(train)) if train.source_of(i) == source]
        person = [groups[i] for i in idx] if groups is not None else None
        if person is not None and any(p is None for p in person):
            person = None  # not every image names its person: split by image
        val += [idx[j] for j in _validation_part([train.labels[i] for i in idx], person, val_fraction, seed)]
    held = set(val)
    return train.subset([i for i in range(len(train)) if i not in held]), train.subset(sorted(val))


def _validation_part(labels: list[int], person: list[str] | None, val_fraction: float, seed: int) -> np.ndarray:
    """One source's validation indices (`stratified_split` with `fraction`), or DatasetError."""
    if person is not None and len(set(person)) < max(2, round(1 / val_fraction)):
        raise DatasetError(
            f"cannot split {len(set(person))} people into a {val_fraction:.0%} validation part by "
            "person; lower --val-fraction or drop the source's split_column"
        )
    try:
        return stratified_split(labels, seed, fraction=val_fraction, groups=person)[0]
    except ValueError as exc:
        raise DatasetError(
            f"cannot carve a stratified {val_fraction:.0%} validation split ({exc}); "
            "add images to the smallest class or lower --val-fraction"
        ) from None


def stratified_split(
    labels: Sequence[int],
    seed: int,
    *,
    n_folds: int | None = None,
    fraction: float | None = None,
    groups: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """The one stratified splitter (scikit-learn, shuffled and seeded): the validation indices
    (sorted) of each part, every part keeping the class proportions of `labels`.

    `n_folds`: all folds of a k-fold split (StratifiedKFold), disjoint and covering every index.
    `fraction`: one part of about that share (StratifiedShuffleSplit, as `train_test_split(...,
    stratify=labels)`). With `groups` (a person per index) a group's indices stay together
    (StratifiedGroupKFold; with `fraction`, the first of round(1 / fraction) folds, at least 2).
    scikit-learn's ValueError when the classes are too small for the split.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

    if (n_folds is None) == (fraction is None):
        raise TypeError("stratified_split: give exactly one of n_folds and fraction")
    if groups is not None:
        splitter = StratifiedGroupKFold(
            n_splits=n_folds or max(2, round(1 / fraction)), shuffle=True, random_state=seed
        )
    elif n_folds is not None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    parts = [np.sort(val) for _, val in splitter.split(np.zeros(len(labels)), labels, groups)]
    return parts[:1] if fraction is not None else parts


def plan_folds(labels: list[int], n_folds: int, seed: int) -> list[np.ndarray]:
    """Validation indices of each fold (sorted): `stratified_split` into `n_folds` folds.

    The folds are disjoint, together cover every index, and each keeps the class proportions
    (every class count within one of its share)."""
    labels = np.asarray(labels)
    if n_folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {n_folds}")
    smallest = int(np.bincount(labels).min()) if labels.size else 0
    if smallest < n_folds:
        raise DatasetError(
            f"cannot make {n_folds} stratified folds: the smallest class has {smallest} training "
            f"images; add images or lower --folds to {max(2, smallest)} or fewer"
        )
    return stratified_split(labels, seed, n_folds=n_folds)


def fold_split(train: Split, n_folds: int, fold: int, seed: int) -> tuple[Split, Split]:
    """(training part, validation part) of `train` for fold `fold` (1..n_folds)."""
    val = plan_folds(train.labels, n_folds, seed)[fold - 1]
    held = set(val.tolist())
    return train.subset([i for i in range(len(train)) if i not in held]), train.subset(val.tolist())


# ----------------------------------------------------------------------------- decoding and caching


def _face_settings(prep: Preprocessing) -> list:
    """What an aligned face depends on besides the image: the face settings and the crop geometry
    they give (the template itself, so a change of the geometry's code shows in the key)."""
    from facegender.core.faces.align import template_landmarks

    return [prep.face, template_landmarks(prep.face_config).round(3).tolist()]


def default_cache_dir() -> Path:
    return cache_folder(None, "aligned")


class ImageLoader:
    """Path -> prepared uint8 array (3, S, S). With face alignment, aligned crops are cached on disk
    (`<key>.png`, or `<key>.noface.png` when no face was found and the image was centred instead;
    keyed by the file's content and the face settings), so an image is detected once, not every run."""

    def __init__(self, preparer: ImagePreparer, cache_dir: Path | None = None):
        self.preparer = preparer
        self.face = preparer.prep.face
        self.cache_dir = (cache_dir or default_cache_dir()) if self.face else None
        self._settings = _face_settings(preparer.prep) if self.face else None

    def __call__(self, path: Path) -> tuple[np.ndarray, bool]:
        if self.face is None:
            return self.preparer.prepare(load_image(path))
        try:
            # The file's content: copies and renamed files share an entry, across datasets and runs.
            key = cache_key(sha256_file(path), *self._settings)
        except OSError:  # unreadable: load_image names the file and the problem
            return self.preparer.prepare(load_image(path))
        found_path, noface_path = (self.cache_dir / f"{key}{suffix}" for suffix in (".png", ".noface.png"))
        for candidate, found in ((found_path, True), (noface_path, False)):
            if candidate.is_file():
                try:
                    return self.preparer.prep.resize(load_image(candidate)), found
                except ImageError:
                    candidate.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
        array, found = self.preparer.prepare(load_image(path))
        store(
            found_path if found else noface_path,
            lambda tmp: Image.fromarray(array.transpose(1, 2, 0)).save(tmp, format="PNG"),
        )
        return array, found


@dataclass
class LoadedSplit:
    """A split whose images were all read once: uint8 arrays (3, S, S) (when kept) and what went
    wrong."""

    split: Split
    images: list[np.ndarray] | None
    bad: list[str]
    no_face: list[Path]


def load_split(
    split: Split,
    loader: ImageLoader,
    keep: bool = True,
    skip_bad: bool = False,
    desc: str = "reading images",
    workers: int | None = None,
    progress: bool = True,
) -> LoadedSplit:
    """Read every image of `split` once (checking it); keep the arrays in memory when `keep`.

    Unreadable files raise DatasetError listing all of them, unless `skip_bad`, in which case they
    are left out (and listed in `bad`).
    """
    workers = workers or min(4, os.cpu_count() or 1)

    def read(path: Path):
        try:
            return loader(path), None
        except ImageError as exc:
            return None, str(exc)

    results = [None] * len(split)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, res in enumerate(
            tqdm(pool.map(read, split.paths), total=len(split), desc=desc, disable=not progress, leave=False)
        ):
            results[i] = res
    bad = [err for _, err in results if err is not None]
    if bad and not skip_bad:
        raise DatasetError(
            format_problems(bad) + "\nFix: delete or replace these files, "
            "or pass --skip-bad to leave them out (they are counted in the summary)."
        )
    keep_idx = [i for i, (ok, _) in enumerate(results) if ok is not None]
    kept = split.subset(keep_idx)
    no_face = [split.paths[i] for i in keep_idx if not results[i][0][1]]
    images = [results[i][0][0] for i in keep_idx] if keep else None
    return LoadedSplit(kept, images, bad, no_face)
