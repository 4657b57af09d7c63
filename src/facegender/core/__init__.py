"""The torch-free runtime: images and files, package resources, preprocessing, face detection and
alignment, the ONNX model, the decision and the result types, `Model` and `load()`.

A prediction-only install (`pip install facegender`) runs on this package alone (with `data`,
`evaluation` and `app` above it); nothing here imports torch or `facegender.training`, except
`model.load` for a PyTorch .pth file (see docs/architecture.md and the contracts in pyproject.toml).
"""
