"""facegender: train, evaluate and serve face gender classifiers by transfer learning.

The Python API (imported on first use: `import facegender` alone loads neither torch nor the model
code):

    import facegender
    run = facegender.train("datasets/mine", preset="best", out="runs/a")   # -> TrainRun (paths, metrics)
    model = facegender.load(run.model_path)                               # -> Model
    model.predict(["a.jpg", "b.png"])                                     # -> [PhotoResult] (.faces, .to_dict())
    pred = facegender.evaluate(model, "datasets/mine/test")               # -> Predictions (pred.probs())
    facegender.export(model, "runs/a/model.onnx", data="datasets/mine")   # ONNX, checked against PyTorch

The layers (docs/architecture.md): `core` (torch-free runtime) < `data` < `evaluation` < `app`
(CLI, server); `training` needs PyTorch (`pip install 'facegender[train]'`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: name -> (module, attribute); attribute None: the module itself.
_LAZY = {
    "train": ("facegender.training.train", "run"),
    "TrainRun": ("facegender.training.train", "TrainRun"),
    "TrainConfig": ("facegender.training.config", "TrainConfig"),
    "load": ("facegender.core.model", "load"),
    "Model": ("facegender.core.model", "Model"),
    "PhotoResult": ("facegender.core.results", "PhotoResult"),
    "Face": ("facegender.core.results", "Face"),
    "default_model_path": ("facegender.core.resources", "default_model_path"),
    "evaluate": ("facegender.evaluation.predictions", "predict_labelled"),
    "Predictions": ("facegender.evaluation.predictions", "Predictions"),
    "export": ("facegender.training.export", "export_model"),
    # the errors (facegender.core.errors): `except facegender.FacegenderError` catches every one of them
    "FacegenderError": ("facegender.core.errors", "FacegenderError"),
    "DataError": ("facegender.core.errors", "DataError"),
    "ConfigError": ("facegender.core.errors", "ConfigError"),
    "ModelFileError": ("facegender.core.errors", "ModelFileError"),
    "MissingExtraError": ("facegender.core.errors", "MissingExtraError"),
    "CheckpointError": ("facegender.core.files", "CheckpointError"),
    "ImageError": ("facegender.core.images", "ImageError"),
    "DatasetError": ("facegender.data.dataset", "DatasetError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'facegender' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
