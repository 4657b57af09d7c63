"""Training configuration: one dataclass, saved as a plain dict in every checkpoint and in config.yaml.

Presets are named sets of overrides on the defaults. `report` is the course report's own recipe;
`best` is the recipe measured best on faces-gdf (see README). Explicit command-line flags
always win over a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    # data
    data: str = ""                       # dataset root with train/ and test/
    out: str = "output"                  # run folder
    val_fraction: float = 0.15           # stratified validation split carved from train/
    val_on_test: bool = False            # the report's protocol: select/stop on test/ (optimistic)
    cv_folds: int = 0                    # `facegender cv`: number of stratified folds of train/ ...
    cv_fold: int = 0                     # ... and which one (1..cv_folds) is this run's validation part
    skip_bad: bool = False               # skip unreadable files instead of failing
    cache: bool = True                   # keep decoded, resized images in memory between epochs
    align: bool = False                  # detect + align faces before training (see faces.py)
    face: dict | None = None             # FaceAlignConfig as a dict when align is on
    # model
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True              # False only with --no-pretrained; recorded in checkpoints
    weights: str | None = None           # explicit pretrained weight file
    image_size: int = 224
    dropout: float = 0.2
    freeze_stem: bool = True             # keep the ImageNet stem / first stage fixed (speed; see README)
    frozen_features: bool = False        # backbone fixed: embeddings computed once, only the head trains
    feature_views: int = 4               # frozen features: augmented views embedded per training image
    trainable_stages: int = -1           # fine-tuning: train only the last N stages of the body (-1: all)
    body_lr_scale: float = 1.0           # fine-tuning: the body's learning rate is lr times this
    # optimisation
    epochs: int = 30                     # upper bound; early stopping usually ends sooner
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"              # adam | adamw
    scheduler: str = "none"              # none | cosine
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: str = "report"              # report | strong
    patience: int = 3
    monitor: str = "val_acc"             # val_acc | val_loss
    tta: bool = False                    # horizontal-flip test-time augmentation in evaluation
    # runtime
    seed: int = 42
    device: str = "auto"                 # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"              # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    workers: int = 0                     # DataLoader workers (0: load in the training process)
    sync_bn: bool = False                # torchrun with CUDA: batch-norm statistics over all processes
    compile: bool = False                # torch.compile the training model (checkpoints stay plain)
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, dict[str, Any]] = {
    # The course report: ResNet18 (ImageNet), its augmentation, Adam 1e-4, batch 32, patience 3,
    # best epoch chosen and training stopped on the test set.
    "report": {
        "backbone": "resnet18",
        "augment": "report",
        "lr": 1e-4,
        "batch_size": 32,
        "patience": 3,
        "dropout": 0.5,
        "val_on_test": True,
        "monitor": "val_loss",
        "freeze_stem": False,
        "label_smoothing": 0.0,
        "scheduler": "none",
    },
    # Measured best on faces-gdf (README, "Best recipe").
    "best": {
        "backbone": "efficientnet_lite0",
        "align": True,
        "augment": "strong",
        "lr": 3e-4,
        "optimizer": "adamw",
        "weight_decay": 1e-4,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "image_size": 160,
        "epochs": 8,
        "patience": 3,
        "tta": True,
    },
}


def build_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig.from_dict(values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    problems = []
    if not 0.0 <= cfg.val_fraction < 1.0:
        problems.append(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction == 0.0 and not cfg.val_on_test:
        problems.append("--val-fraction 0 needs --val-on-test (something must choose the best epoch)")
    if cfg.cv_fold and not (cfg.cv_folds >= 2 and 1 <= cfg.cv_fold <= cfg.cv_folds and not cfg.val_on_test):
        problems.append(f"cross-validation fold {cfg.cv_fold} of {cfg.cv_folds}: need 2 or more folds, "
                        "fold between 1 and the number of folds, and no --val-on-test")
    if cfg.monitor not in ("val_acc", "val_loss"):
        problems.append(f"--monitor must be val_acc or val_loss, got {cfg.monitor!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1:
        problems.append("--epochs, --batch-size and --patience must be at least 1")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.augment not in ("report", "strong", "light", "none"):
        problems.append(f"--augment must be report, strong, light or none, got {cfg.augment!r}")
    if cfg.feature_views < 1:
        problems.append(f"--feature-views must be at least 1, got {cfg.feature_views}")
    if cfg.optimizer not in ("adam", "adamw"):
        problems.append(f"--optimizer must be adam or adamw, got {cfg.optimizer!r}")
    if cfg.scheduler not in ("none", "cosine"):
        problems.append(f"--scheduler must be none or cosine, got {cfg.scheduler!r}")
    if problems:
        raise ValueError("; ".join(problems))
