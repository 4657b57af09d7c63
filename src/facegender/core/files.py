"""Files written safely, the file names of a run folder, and the errors for a bad model file or
missing pretrained weights.

No PyTorch here: prediction from an exported model uses this module too.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from facegender.core.errors import ModelFileError

# The files of a run folder (`facegender train --out`), named in one place.
BEST_MODEL = "best_model.pth"
CHECKPOINT = "gender_checkpoint.pth"
SUMMARY_CSV = "summary.csv"
CONFIG_YAML = "config.yaml"
METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"


class CheckpointError(ModelFileError, ValueError):
    """A model, checkpoint or weight file is missing, damaged or not the one expected (a facegender file,
    dlib's weights)."""


class WeightsNotFoundError(ModelFileError, RuntimeError):
    """Pretrained weights could not be found or downloaded."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step.

    A crash or Ctrl-C while writing leaves the previous file untouched (and no partial file).
    The result gets the permissions of a newly created file (0666 minus the umask), not mkstemp's
    private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it, so put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
