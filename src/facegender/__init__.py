"""facegender: train, evaluate and serve face gender classifiers by transfer learning."""

__version__ = "0.1.0"
