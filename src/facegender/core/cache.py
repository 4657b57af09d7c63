"""facegender's disk caches, keyed and written one way.

Four caches live under `resources.cache_dir()` ($FACEGENDER_CACHE, else $XDG_CACHE_HOME/facegender,
else ~/.cache/facegender):

* `aligned/`: the aligned face of each training image (data/dataset.py), keyed by the file's
  content and the face settings with the crop geometry they give;
* `features/`: a fixed network's outputs for each prepared image (training/features.py), keyed by
  the image's pixels, the preprocessing, the network and the view recipe;
* `dlib_resnet_v1-<sha256 of the .dat, 16 hex>-<size>px.onnx`: dlib's network as ONNX
  (core/dlib_onnx.py), with a `.json` record of its source and checksum;
* `dlib_resnet_v1-<sha256 of the .dat, 16 hex>.pth`: the same weights converted for PyTorch
  (training/dlib_resnet.py), checksums inside.

`cache_key` makes a key from everything an entry depends on; `cached_file` returns an entry,
building it first when it is missing (or fails its check). Every entry is written to a temporary
file beside it and renamed into place (`files.atomic_path`), so a crash or a concurrent run never
leaves a partial entry. A key only says what an entry was made from; an entry made from other
inputs is another file, never a stale one.

Keys changed format when the caches came here (aligned faces and features were sha1 of their own
salts): entries made by earlier versions are no longer found and are simply rebuilt on first use
(delete the old files to free the space). The two dlib caches kept their names and formats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facegender.core import resources
from facegender.core.files import atomic_path, sha256_file, write_text_atomic


def cache_folder(override: str | os.PathLike | None = None, *parts: str) -> Path:
    """`override` when given (a caller's own cache folder), else `resources.cache_dir(*parts)`."""
    return Path(override) if override is not None else resources.cache_dir(*parts)


def cache_key(*parts: Any) -> str:
    """The sha256 (hex) of `parts`, in order: bytes-like parts (file contents, pixels) as they are,
    anything else as JSON (keys sorted; tuples as lists). Each part is framed with its kind and
    length, so no two different sequences of parts give the same key."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            kind, data = b"b", bytes(part)
        else:
            kind, data = b"j", json.dumps(part, sort_keys=True, ensure_ascii=False, default=_plain).encode()
        h.update(kind + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """JSON for what `json` does not know: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cache_key: cannot serialise {type(value).__name__} {value!r}")


def store(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary file beside `path`, then rename it to `path` (atomic). When
    `write` fails, nothing is left behind: not the temporary file, nor the folder if this made it."""
    path = Path(path)
    created = not path.parent.exists()
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty: someone else is using it
                path.parent.rmdir()
        raise
    return path


def cached_file(
    folder: str | os.PathLike,
    key: str,
    suffix: str,
    build: Callable[[Path], None],
    *,
    valid: Callable[[Path], bool] | None = None,
    record: dict | None = None,
) -> Path:
    """The cache entry `folder/<key><suffix>`, built first (`build(tmp)` writes it; see `store`)
    when it is missing or fails its checks:

    * `valid(path)`: the caller's own check of an existing entry (it warns about what it finds);
    * `record`: the entry has a sidecar `<name>.json` holding `record` plus the entry's sha256
      (as `<suffix>_sha256`), written after the entry. An entry whose sidecar is missing,
      unreadable or different is rebuilt, with a warning when either file was there. A valid
      entry is then checked by hashing it alone (the builder's inputs are not touched).
    """
    path = Path(folder) / f"{key}{suffix}"
    sidecar = path.with_name(path.name + ".json")
    checksum = f"{suffix.lstrip('.')}_sha256"
    if (
        path.is_file()
        and (record is None or _record_matches(path, sidecar, record, checksum))
        and (valid is None or valid(path))
    ):
        return path
    if record is not None and (path.exists() or sidecar.exists()):
        warnings.warn(f"{path}: damaged or stale cache (checked against {sidecar.name}); rebuilding it", stacklevel=3)
    store(path, build)
    if record is not None:
        write_text_atomic(json.dumps({**record, checksum: sha256_file(path)}, indent=1), sidecar)
    return path


def _record_matches(path: Path, sidecar: Path, record: dict, checksum: str) -> bool:
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
        return stored == {**record, checksum: sha256_file(path)}
    except (OSError, ValueError):
        return False
