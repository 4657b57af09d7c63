"""The predictions record of a labelled image set, and how a model makes one.

`predict_labelled(model, folder)` runs a loaded `core.model.Model` over a folder with one subfolder
per class (or a split that training has already read) and returns `Predictions`: the logits, the
labels and what is needed to read them (temperature, TTA, threshold). `evaluate`, `report`, `train`
and the bundled-model build all read this one record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facegender.core.decision import apply_temperature, decide
from facegender.core.preprocessing import Preprocessing


@dataclass
class Predictions:
    """Logits of a labelled image set, with what is needed to read them (`predict_labelled` makes
    one; `evaluation.evaluate.analyse`, `evaluation.report` and `training.train` read it)."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # (N,) class indices
    logits: np.ndarray  # (N, C) as evaluated: the mean with the mirror image when `tta`
    temperature: float = 1.0
    tta: bool = False
    logits_plain: np.ndarray | None = None  # (N, C) without test-time augmentation, when `tta`
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad)
    threshold: float | None = None  # the decision threshold on p(classes[1]); None: the arg-max

    def probs(self, calibrated: bool = True) -> np.ndarray:
        return apply_temperature(self.logits, self.temperature if calibrated else 1.0)

    @classmethod
    def concat(cls, parts: Sequence[Predictions]) -> Predictions:
        """One record of several sets evaluated by the same model (`evaluate --data A --data B`)."""
        first = parts[0]
        plain = [p.logits_plain for p in parts]
        return cls(
            first.classes,
            [path for p in parts for path in p.paths],
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.logits for p in parts]),
            first.temperature,
            first.tta,
            None if any(x is None for x in plain) else np.concatenate(plain),
            [s for p in parts for s in p.skipped],
            first.threshold,
        )

    def predicted(self, logits=None) -> np.ndarray:
        """The predicted class indices (N,): `decide` on the calibrated probabilities of `logits`
        (default: the evaluated ones) at this record's threshold."""
        logits = self.logits if logits is None else logits
        return decide(apply_temperature(logits, self.temperature), self.threshold)


def predict_labelled(
    model,
    data,
    skip_bad: bool = False,
    batch_size: int | None = None,
    loader=None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Predictions:
    """Logits of every image of a labelled set: a folder with one subfolder per class of this
    model (e.g. DATASET/test), or a `data.dataset.LoadedSplit` already read (training's test split,
    with its image `loader`). Each image is one face, prepared as in training (the largest face
    aligned when the model aligns faces). With TTA the plain logits are kept too."""
    from tqdm.auto import tqdm

    if isinstance(data, (str, os.PathLike)):
        loaded, loader = read_labelled(data, model.classes, model.prep, skip_bad, log, progress)
    else:
        loaded = data
    paths, size = loaded.split.paths, batch_size or 2 * model.batch_size
    if loaded.images is None and loader is None:
        raise ValueError("evaluate: a split read without keeping its images needs its image loader")
    plain, mirrored, labels = [], [], []
    for start in tqdm(range(0, len(paths), size), desc="evaluate", leave=False, disable=not progress, unit="batch"):
        stop = min(start + size, len(paths))
        crops = loaded.images[start:stop] if loaded.images is not None else [loader(p)[0] for p in paths[start:stop]]
        a, b = model.logit_views(model.normalize(crops))
        plain.append(a)
        mirrored.append(b)
        labels.append(np.asarray(loaded.split.labels[start:stop], dtype=np.int64))
    n_classes = len(model.classes)
    plain_all = np.concatenate(plain).astype(np.float64) if plain else np.zeros((0, n_classes))
    logits, logits_plain = plain_all, None
    if model.tta:
        mirrored_all = np.concatenate(mirrored).astype(np.float64) if mirrored else np.zeros((0, n_classes))
        logits, logits_plain = (plain_all + mirrored_all) / 2, plain_all
    return Predictions(
        list(model.classes),
        list(loaded.split.paths),
        np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        logits,
        model.temperature,
        model.tta,
        logits_plain,
        list(loaded.bad),
        model.threshold,
    )


def read_labelled(
    folder: str | os.PathLike,
    classes: list[str],
    prep: Preprocessing,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
):
    """(loaded split, image loader) of `folder`/<class>/* for a model with `classes` (the class
    folders must be classes of the model; labels are the model's class indices)."""
    from facegender.core.preprocessing import ImagePreparer
    from facegender.data.dataset import DatasetError, ImageLoader, find_classes, load_split, scan_split
    from facegender.data.prepare import loader_preprocessing

    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found; pass a folder with one subfolder per class")
    folders = find_classes(folder)
    unknown = sorted(set(folders) - set(classes))
    if unknown or not folders:
        raise DatasetError(
            f"{folder}: class folders {unknown or folders or 'none'} are not classes of this "
            f"model ({classes}); pass a folder like DATASET/test with subfolders {classes}"
        )
    present = [c for c in classes if c in folders]
    split, problems = scan_split(folder, present)
    split.labels = [classes.index(present[i]) for i in split.labels]  # the model's class indices
    if problems and not skip_bad:
        raise DatasetError("\n".join(problems))
    loader = ImageLoader(ImagePreparer(loader_preprocessing(prep, folder, log)))  # no 2nd alignment
    return load_split(split, loader, skip_bad=skip_bad, desc="reading images", progress=progress), loader
