"""The PyTorch backend of `core.model.Model`: a best_model.pth network at one precision.

Inference precision is one decision for every command (`load(..., precision=...)`, `--precision`
on the command line), so `evaluate`, `report`, `predict`, `serve`, the final test evaluation of
`train` and export's parity check give the same probability for the same image. `core.model.load`
comes here for a .pth file only; an exported .onnx never imports this module (or torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facegender.core.model import DEFAULT_PRECISION
from facegender.training import checkpoint as ckpt
from facegender.training.engine import autocast, select_device, select_precision

# ----------------------------------------------------------------------------- backends


class TorchBackend:
    """A PyTorch network (eval mode) on `device` at `precision` (fp32, bf16, fp16 or auto)."""

    runtime = "pytorch"

    def __init__(
        self,
        module,
        device="cpu",
        precision: str = DEFAULT_PRECISION,
        channels_last: bool = False,
        threads: int | None = None,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)  # process-wide, as PyTorch has it

        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.precision = select_precision(precision, self.device)
        self.channels_last = channels_last and self.device.type != "mps"
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)

    def logits(self, batch) -> np.ndarray:
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.module(x).float().cpu().numpy()

    __call__ = logits


def load_checkpoint_backend(
    path: Path, device: str = "auto", precision: str = DEFAULT_PRECISION, threads: int | None = None
) -> tuple[TorchBackend, dict[str, Any]]:
    """(backend, record) of a best_model.pth for `core.model.load`; CheckpointError for a training
    checkpoint (gender_checkpoint.pth), which holds the last epoch, not the best one."""
    network, meta = ckpt.load_model(path, select_device(device))
    if "optimizer_state" in meta:
        raise ckpt.CheckpointError(
            f"{path}: a training checkpoint (for `facegender train --resume`), not a model to predict with: "
            f"it holds the last epoch ({meta.get('epoch')}), not the best one, and no calibrated temperature; "
            f"pass {path.parent / 'best_model.pth'}"
        )
    backend = TorchBackend(network, next(network.parameters()).device, precision, threads=threads)
    return backend, {k: v for k, v in meta.items() if k != "model_state"}
