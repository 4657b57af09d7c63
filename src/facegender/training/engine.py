"""The training and evaluation loops as plain functions returning metrics, their data loader, and
early stopping."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from facegender.core.errors import ConfigError, TrainingDivergedError
from facegender.data.dataset import ImageLoader, LoadedSplit


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators (the one seeding function)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    fp16 on older CUDA cards, otherwise fp32 (on CPUs without bf16 units, bf16 autocast is many
    times slower than fp32: 0.4 vs 7.3 img/s for resnet18 on this project's CPU)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (fp32, bf16 or fp16; see `select_precision`)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is not resolved; call select_precision first")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class FaceDataset(Dataset):
    """(normalised image tensor, label) pairs from the prepared uint8 images of a split, kept in
    memory or read on access."""

    def __init__(
        self, loaded: LoadedSplit, transform: Callable[[np.ndarray], torch.Tensor], loader: ImageLoader | None = None
    ):
        self.paths, self.labels = loaded.split.paths, loaded.split.labels
        self.images = loaded.images
        self.transform = transform
        self.loader = loader
        if self.images is None and loader is None:
            raise ValueError("an uncached FaceDataset needs a loader")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i] if self.images is not None else self.loader(self.paths[i])[0]
        return self.transform(img), self.labels[i]


class EpochWeightedSampler(torch.utils.data.WeightedRandomSampler):
    """Draws len(weights) samples with replacement, image i with probability proportional to
    weights[i]; `set_epoch(epoch)` reseeds with seed + epoch (the same draw after a resume)."""

    def __init__(self, weights, seed: int = 0):
        self.seed = seed
        super().__init__(
            torch.as_tensor(weights, dtype=torch.double),
            num_samples=len(weights),
            replacement=True,
            generator=torch.Generator().manual_seed(seed),
        )

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0, sampler=None
) -> DataLoader:
    """DataLoader with a seeded shuffle (the same order after a resume: seed is base seed + epoch)."""
    generator = torch.Generator().manual_seed(seed) if shuffle and sampler is None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    optimizer,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    scheduler=None,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """One pass over `loader`; returns {'loss', 'acc', 'n', 'seconds', 'images_per_sec'}.
    `on_step` runs after every optimizer step (a weight average's update)."""
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        if not math.isfinite(loss.item()):
            raise TrainingDivergedError(f"training loss is {loss.item()}; lower --lr or use --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if on_step is not None:
            on_step()
        if scheduler is not None:
            scheduler.step()
        b = labels.size(0)
        total_loss += loss.item() * b
        correct += (logits.argmax(1) == labels).sum().item()
        n += b
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / n:.4f}", acc=f"{correct / n:.3f}", img_s=f"{n / elapsed:.1f}")
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(n, 1),
        "acc": correct / max(n, 1),
        "n": n,
        "seconds": seconds,
        "images_per_sec": n / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C) float32 on CPU, labels (N,)) for every batch of `loader`, at the training
    precision (validation during training; inference after training is `core.model.Model`)."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch"):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images).float()
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(
    model: nn.Module,
    loader,
    criterion,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    desc: str = "eval",
    progress: bool = True,
) -> dict:
    """{'loss', 'acc', 'n', 'logits', 'labels'} on `loader` (model in eval mode, no gradients)."""
    logits, labels = predict_logits(model, loader, device, precision, channels_last, desc, progress)
    return summarize_logits(logits, labels, criterion)


def summarize_logits(logits: torch.Tensor, labels: torch.Tensor, criterion) -> dict:
    """{'loss', 'acc', 'n', 'logits', 'labels'} of logits already computed (also for gathered ones)."""
    n = labels.numel()
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "n": 0, "logits": logits, "labels": labels}
    loss = criterion(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return {"loss": loss, "acc": acc, "n": n, "logits": logits, "labels": labels}


class WeightAverage:
    """An exponential moving average of a module's weights (torch.optim.swa_utils.AveragedModel),
    updated after every step; `applied()` puts the average into the module for a while (to
    validate and save it) and then the live weights back, so training goes on unchanged."""

    def __init__(self, module: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.module = module
        self.average = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self) -> None:
        self.average.update_parameters(self.module)

    @contextlib.contextmanager
    def applied(self):
        live = [t.detach().clone() for t in _weights(self.module)]
        with torch.no_grad():
            for t, a in zip(_weights(self.module), _weights(self.average.module)):
                t.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, saved in zip(_weights(self.module), live):
                    t.copy_(saved)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without improvement of the monitored value."""

    patience: int = 3
    mode: str = "max"  # max for accuracy, min for loss
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is the best so far."""
        better = (
            self.best is None
            or (self.mode == "max" and value > self.best + self.min_delta)
            or (self.mode == "min" and value < self.best - self.min_delta)
        )
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
