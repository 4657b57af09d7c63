"""Everything that needs PyTorch (`pip install 'facegender[train]'`): configs and presets,
backbones, dlib's network in torch, transforms, feature extraction, the training loop,
checkpoints, distributed training, cross-validation and ONNX export. Importing this package
imports no torch; its modules do."""
