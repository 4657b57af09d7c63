"""Frozen-feature training: the fixed body's embedding of every training image, computed once.

With `frozen_features` the body never changes, so its output for an image is the same in every
epoch (and in every run and cross-validation fold on the same images). Each training image is
embedded in `views` versions: view 0 as it is, view 1 mirrored, the others lightly jittered
(`TrainPreset(prep, "light")`, seeded per image and view). The head then trains on those vectors,
and an epoch takes milliseconds instead of minutes.

Embeddings are cached on disk, one small .npy file per image, keyed by the prepared image's bytes,
the preprocessing, the body's weights and the view recipe (`core.cache`): a second run, or the next fold, reads
them instead of running the network. View k of an image is the same whatever the number of views,
so a file with more views also serves a request for fewer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from facegender.core.cache import cache_folder, cache_key, store
from facegender.core.preprocessing import Preprocessing
from facegender.training.transforms import EvalPreset, TrainPreset

#: Bump when the views' recipe changes, so old cached embeddings are not reused.
VIEWS_VERSION = 1


class FeatureExtractor:
    """uint8 prepared images -> (N, views, ...) outputs of a fixed network, cached on disk: the
    frozen body's embeddings (frozen features), or the frozen first stages' feature maps
    (fine-tuning on a cached prefix, stored as float16 to halve memory and disk).

    `body_id` names the network's weights (and its cut); `augment` is the TrainPreset recipe of
    the jittered views (2 and up)."""

    def __init__(
        self,
        body: nn.Module,
        prep: Preprocessing,
        body_id: str,
        device: torch.device,
        cache_dir: Path | None = None,
        batch_size: int = 64,
        augment: str = "light",
        dtype: type = np.float32,
    ):
        self.body = body
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        self.eval_tf = EvalPreset(prep)
        self.jitter_tf = TrainPreset(prep, augment)
        self.cache_dir = cache_folder(cache_dir, "features")
        salt = [VIEWS_VERSION, prep.to_dict(), body_id]
        if augment != "light" or dtype is not np.float32:  # (the frozen-feature seeds stay as they were)
            salt += [augment, np.dtype(dtype).name]
        self._salt = salt
        self._seed_salt = json.dumps(salt, sort_keys=True).encode()

    def _key(self, image: np.ndarray) -> str:
        """The cache key of a prepared image's outputs (`cache.cache_key` of the salt and the pixels)."""
        return cache_key(self._salt, np.ascontiguousarray(image).tobytes())

    def _seed(self, image: np.ndarray) -> int:
        """The seed of an image's jittered views: from sha1 of the salt and the pixels, as before the
        cache keys moved to `cache.cache_key`, so training on the views gives the same numbers."""
        h = hashlib.sha1(self._seed_salt)
        h.update(np.ascontiguousarray(image).tobytes())
        return int(h.hexdigest()[:12], 16)

    def view(self, image: np.ndarray, index: int, seed: int) -> torch.Tensor:
        """The normalised float tensor of view `index` of a prepared uint8 image (3, S, S); `seed`:
        the image's `_seed`."""
        if index == 0:
            return self.eval_tf(image)
        if index == 1:
            return self.eval_tf(image[..., ::-1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            return self.jitter_tf(image)

    @torch.no_grad()
    def embed(
        self,
        images: Sequence[np.ndarray],
        views: int = 1,
        desc: str = "embedding",
        progress: bool = True,
        to_disk: bool = False,
    ) -> torch.Tensor:
        """(len(images), views, ...): cached where possible, the rest computed in batches, a batch
        of images at a time. An image cached with fewer views gets only the missing ones computed
        (a validation image of one run is a training image of the next seed's). `images` may read
        each image on access; with `to_disk` the result is a memory-mapped temporary file, so
        memory does not grow with the number of images."""
        result = None
        with tqdm(total=len(images) * views, desc=desc, disable=not progress, leave=False, unit="view") as bar:
            for start in range(0, len(images), self.batch_size):
                chunk = self._embed_chunk(
                    [images[i] for i in range(start, min(len(images), start + self.batch_size))], views
                )
                if result is None:
                    result = self._allocate((len(images), *chunk.shape[1:]), to_disk)
                result[start : start + len(chunk)] = chunk
                bar.update(len(chunk) * views)
        return torch.from_numpy(result) if result is not None else torch.empty(0, views, 0, dtype=torch.float32)

    def _embed_chunk(self, images: list[np.ndarray], views: int) -> np.ndarray:
        keys = [self._key(img) for img in images]
        have = [self._load(key) for key in keys]
        done = {i: h[:views] for i, h in enumerate(have) if h is not None and h.shape[0] >= views}
        parts = {i: list(h) if h is not None else [] for i, h in enumerate(have) if i not in done}
        items = [(i, v) for i in parts for v in range(len(parts[i]), views)]
        seeds = {i: self._seed(images[i]) for i in parts}
        if items:
            self.body.eval()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(items), self.batch_size):
            batch_items = items[start : start + self.batch_size]
            batch = torch.stack([self.view(images[i], v, seeds[i]) for i, v in batch_items]).to(self.device)
            for (i, _), e in zip(batch_items, self.body(batch).float().cpu().numpy()):
                parts[i].append(e.astype(self.dtype))
        for i, p in parts.items():
            done[i] = self._store(keys[i], np.stack(p))
        return np.stack([done[i] for i in range(len(images))])

    def _allocate(self, shape: tuple[int, ...], to_disk: bool) -> np.ndarray:
        if not to_disk:
            return np.empty(shape, dtype=self.dtype)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".npy", dir=self.cache_dir, prefix="run-")
        os.close(fd)
        array = np.lib.format.open_memmap(name, mode="w+", dtype=self.dtype, shape=shape)
        with contextlib.suppress(OSError):  # POSIX: the mapping lives on, the file goes at the end
            os.unlink(name)
        return array

    def _load(self, key: str) -> np.ndarray | None:
        """The cached views of an image, or None (a damaged entry is recomputed and rewritten)."""
        cached = self.cache_dir / f"{key}.npy"
        if not cached.is_file():
            return None
        try:
            arr = np.load(cached, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr if arr.ndim >= 2 and arr.dtype == self.dtype else None

    def _store(self, key: str, arr: np.ndarray) -> np.ndarray:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)

        store(self.cache_dir / f"{key}.npy", write)
        return arr


class ViewDataset(torch.utils.data.Dataset):
    """Every view of every image as one (float32 input, label) sample, image-major: sample k is
    view k % views of image k // views."""

    def __init__(self, outputs: torch.Tensor, labels: Sequence[int]):
        n, views = outputs.shape[:2]
        self.inputs = outputs.reshape(n * views, *outputs.shape[2:])
        self.labels = torch.as_tensor(list(labels), dtype=torch.long).repeat_interleave(views)
        self.views = views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i].float(), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices)  # one indexing per batch, not one per sample
        return list(zip(self.inputs[idx].float(), self.labels[idx]))


def feature_dataset(embeddings: torch.Tensor, labels: Sequence[int]) -> ViewDataset:
    """Every view of every image as one (embedding, label) sample."""
    return ViewDataset(embeddings, labels)
