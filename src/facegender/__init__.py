"""facegender: train, evaluate and serve face gender classifiers by transfer learning.

The Python API (imported on first use: `import facegender` alone loads neither torch nor the model
code):

    import facegender
    run = facegender.train("datasets/mine", preset="best", out="runs/a")   # -> TrainRun (paths, metrics)
    model = facegender.load(run.model_path)                               # -> inference.Model
    model.predict(["a.jpg", "b.png"])                                     # faces, labels, probabilities

`facegender.train` is the module `facegender.train`, made callable: calling it is `train.run`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: name -> (module, attribute); attribute None: the module itself.
_LAZY = {
    "train": ("facegender.train", None),
    "TrainRun": ("facegender.train", "TrainRun"),
    "load": ("facegender.inference", "load"),
    "Model": ("facegender.inference", "Model"),
    "default_model_path": ("facegender.inference", "default_model_path"),
    "TrainConfig": ("facegender.config", "TrainConfig"),
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
