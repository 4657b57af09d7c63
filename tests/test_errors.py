"""The error hierarchy (core/errors.py) and what the `facegender` command does with each kind:
a user error is one line on stderr and its class's exit code; anything else is a bug and shows
its traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import facegender
from facegender.app import cli
from facegender.core.errors import (
    ConfigError,
    DataError,
    FacegenderError,
    MissingExtraError,
    ModelFileError,
    extra_for,
    require,
)


def project_modules():
    """Every module of the package that imports here (one needing an extra this venv lacks is left out)."""
    for info in pkgutil.walk_packages(facegender.__path__, "facegender."):
        try:
            yield importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if extra_for(exc.name) is None:
                raise


def project_exceptions() -> list[type]:
    from starlette.exceptions import HTTPException

    found = {
        obj
        for module in project_modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__.startswith("facegender.")
    }
    return [cls for cls in found if not issubclass(cls, HTTPException)]  # serve's HTTP responses are replies


def test_every_project_exception_is_a_facegender_error():
    classes = project_exceptions()
    names = {cls.__name__ for cls in classes}
    assert {
        "CheckpointError",
        "WeightsNotFoundError",
        "ImageError",
        "DatasetError",
        "ParityError",
        "TrainingInterrupted",
        "ConfigError",
        "MissingExtraError",
    } <= names, names
    assert [cls for cls in classes if not issubclass(cls, FacegenderError)] == []


def test_the_classes_keep_their_builtin_bases():
    from facegender.core.files import CheckpointError, WeightsNotFoundError
    from facegender.core.images import ImageError
    from facegender.data.dataset import DatasetError
    from facegender.training.export import ParityError

    for cls, kind, builtin in (
        (CheckpointError, ModelFileError, ValueError),
        (WeightsNotFoundError, ModelFileError, RuntimeError),
        (ImageError, DataError, ValueError),
        (DatasetError, DataError, ValueError),
        (ParityError, FacegenderError, ValueError),
        (ConfigError, DataError, ValueError),
    ):
        assert issubclass(cls, kind) and issubclass(cls, builtin), cls
    assert (FacegenderError.exit_code, DataError.exit_code, ModelFileError.exit_code, MissingExtraError.exit_code) == (
        1,
        3,
        4,
        5,
    )
    assert facegender.FacegenderError is FacegenderError and facegender.DatasetError is DatasetError


def test_user_errors_raised_as_builtins_before_are_still_caught_as_them():
    from facegender.core.decision import check_threshold
    from facegender.training.config import build_config

    with pytest.raises(ValueError) as exc:
        check_threshold(1.5)
    assert isinstance(exc.value, ConfigError)
    with pytest.raises(ValueError, match="--val-fraction") as exc:
        build_config(None, val_fraction=2.0)
    assert isinstance(exc.value, ConfigError)


def test_require_names_the_extra_of_a_missing_module(monkeypatch):
    assert require("json").dumps([]) == "[]"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ModuleNotFoundError
    with pytest.raises(MissingExtraError, match=r"pip install 'facegender\[ray\]'") as exc:
        require("ray", "predict --ray")
    assert exc.value.extra == "ray" and exc.value.name == "ray" and isinstance(exc.value, ModuleNotFoundError)
    assert str(exc.value).startswith("predict --ray needs Ray")
    with pytest.raises(ModuleNotFoundError) as exc:
        require("no_such_module_of_any_extra")
    assert not isinstance(exc.value, MissingExtraError)
    assert (extra_for("sklearn.metrics"), extra_for("torch"), extra_for("yaml"), extra_for("numpy")) == (
        "eval",
        "train",
        "train",
        None,
    )


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"facegender {command}: error: "), err
    return err[0]


def test_a_bad_dataset_path_is_a_data_error(tmp_path, capsys):
    assert cli.main(["prepare", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 3
    assert "nowhere" in one_error_line(capsys, "prepare")


def test_a_corrupt_model_file_is_a_model_file_error(tmp_path, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not an onnx model" * 10)
    assert cli.main(["predict", "--model", str(model), "--sample", "--quiet"]) == 4
    assert "cannot be read as an ONNX model" in one_error_line(capsys, "predict")


def test_an_unknown_config_value_is_a_data_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert cli.main(["train", "--data", str(tmp_path), "--val-fraction", "2", "--quiet"]) == 3
    assert "--val-fraction must be in [0, 1)" in one_error_line(capsys, "train")


def raising(exc: BaseException):
    def run(args):
        raise exc

    return run


def test_a_missing_module_of_an_extra_names_the_extra(monkeypatch, capsys):
    add = cli.COMMANDS["models"][0]
    monkeypatch.setitem(cli.COMMANDS, "models", (add, raising(ModuleNotFoundError("no sklearn", name="sklearn"))))
    assert cli.main(["models"]) == 5
    assert "pip install 'facegender[eval]'" in one_error_line(capsys, "models")
    monkeypatch.setitem(cli.COMMANDS, "models", (add, raising(KeyboardInterrupt())))
    assert cli.main(["models"]) == 130


@pytest.mark.parametrize(
    "bug",
    [
        ValueError("bug"),
        KeyError("bug"),
        FileNotFoundError("bug"),
        ModuleNotFoundError("no module named 'nothing_optional'", name="nothing_optional"),
    ],
)
def test_a_bug_is_not_taken_for_a_user_error(monkeypatch, bug):
    monkeypatch.setitem(cli.COMMANDS, "models", (cli.COMMANDS["models"][0], raising(bug)))
    with pytest.raises(type(bug)):
        cli.main(["models"])


def run_python(program: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_command_shows_a_bug_as_a_traceback(tmp_path):
    proc = run_python(
        """
        import sys
        from facegender.app import cli

        def bug(args):
            raise ValueError("bug")

        cli.COMMANDS["models"] = (cli.COMMANDS["models"][0], bug)
        sys.exit(cli.main(["models"]))
    """,
        tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: bug" in proc.stderr
    assert "facegender models: error" not in proc.stderr


def test_training_without_torch_is_a_missing_extra(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
    proc = run_python(
        f"""
        import sys
        sys.modules["torch"] = None  # `import torch` raises ModuleNotFoundError, as without the train extra
        from facegender.app import cli
        sys.exit(cli.main(["train", "--data", {str(tmp_path / "data")!r}, "--quiet"]))
    """,
        tmp_path,
    )
    assert proc.returncode == 5, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("facegender train: error: this needs PyTorch") and "facegender[train]" in line
