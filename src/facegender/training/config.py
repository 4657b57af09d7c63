"""Training configuration: one dataclass, saved as a plain dict in every checkpoint and in config.yaml.

Presets are named sets of overrides on the defaults. `report` is the course report's own recipe;
`best` is the recipe measured best out of source (docs/recipes.md). Explicit command-line flags
always win over a preset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from facegender.core.errors import ConfigError


def option(default: Any, help: str, group: str = "runtime", cli: bool = True, **argparse_kwargs: Any):
    """A TrainConfig field with its command-line help: `facegender train` and `cv` make one option
    per field from these (`app/cli.py`), so name, type, default and help live here only. `group` is the
    --help section; `argparse_kwargs` (choices, metavar, flag) go to argparse; `cli=False`: no option.
    An empty list default makes a repeatable option (`--data A --data B`)."""
    metadata = {"help": help, "group": group, "cli": cli, **argparse_kwargs}
    if default == []:
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # data
    data: list[str] = option(
        [],
        "a training source: a dataset folder with train/ (and test/) or a folder of "
        "class folders (all training images); repeat to combine sources, or name a "
        "sources .yaml file (docs/recipes.md)",
        "data",
        metavar="FOLDER",
    )
    out: str = option("output", "run folder for models, curves and metrics", "data")
    val_fraction: float = option(0.15, "share of train/ held out (stratified) for validation", "data")
    val_on_test: bool = option(
        False, "choose the best epoch on test/ like the course report (optimistic; warns)", "data"
    )
    cv_folds: int = option(0, "`facegender cv`: number of stratified folds of train/", "data", cli=False)
    cv_fold: int = option(0, "`facegender cv`: the fold (1..cv_folds) that validates this run", "data", cli=False)
    balance: str = option(
        "none",
        "sampling: none; class (each class equally often); source (each source and "
        "class equally often); group (each class and --balance-column value equally often)",
        "data",
        choices=["none", "class", "source", "group"],
    )
    balance_column: str | None = option(
        None, "--balance group: the manifest.csv column (or 'source')", "data", metavar="COLUMN"
    )
    skip_bad: bool = option(False, "leave unreadable images out (with a warning) instead of stopping", "data")
    cache: bool = option(True, "keep decoded, resized images in memory between epochs", "data")
    align: bool = option(False, "detect and align faces before training (see docs/faces.md)", "data")
    visible_region: bool = option(
        True,
        "aligned faces: grey out the part of the crop that most training images "
        "leave empty (tight crops), in training and prediction alike",
        "data",
    )
    face: dict | None = option(None, "face alignment settings (FaceAlignConfig) when align is on", "data", cli=False)
    # model
    backbone: str = option(
        "efficientnet_lite0",
        "efficientnet_lite0 (offline weights), resnet18, resnet50, "
        "mobilenet_v3_large, efficientnet_b0, ... (training/backbones.py)",
        "model",
    )
    pretrained: bool = option(
        True, "start from ImageNet weights; --no-pretrained: random weights (recorded in the model file)", "model"
    )
    weights: str | None = option(None, "ImageNet weight file for the backbone", "model", metavar="FILE")
    image_size: int = option(224, "input size in pixels", "model")
    dropout: float = option(0.2, "dropout before the final layer", "model")
    freeze_stem: bool = option(True, "keep the backbone's first layers fixed (faster)", "model")
    frozen_features: bool = option(False, "backbone fixed: embeddings computed once, only the head trains", "model")
    feature_views: int = option(4, "frozen features: augmented views embedded per training image", "model")
    trainable_stages: int = option(-1, "fine-tuning: train only the last N stages of the body (-1: all)", "model")
    body_lr_scale: float = option(1.0, "fine-tuning: the body's learning rate is lr times this", "model")
    cached_prefix: bool = option(
        True,
        "fine-tuning the last stages: the frozen first stages' output of each "
        "view (--feature-views) is computed once and cached, so an epoch only runs "
        "the trainable stages",
        "model",
    )
    # optimisation
    epochs: int = option(30, "maximum epochs (early stopping usually ends sooner)", "optimisation")
    batch_size: int = option(32, "images per training step", "optimisation")
    lr: float = option(1e-4, "learning rate", "optimisation")
    weight_decay: float = option(0.0, "weight decay", "optimisation")
    optimizer: str = option("adam", "optimizer", "optimisation", choices=["adam", "adamw"])
    scheduler: str = option(
        "none",
        "learning-rate schedule: none, or cosine decay after the warm-up",
        "optimisation",
        choices=["none", "cosine"],
    )
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up (with --scheduler cosine)", "optimisation")
    label_smoothing: float = option(0.0, "label smoothing of the training loss", "optimisation")
    augment: str = option(
        "report", "augmentation recipe", "optimisation", choices=["report", "strong", "light", "none"]
    )
    ema: float = option(
        0.0,
        "weight averaging: validate and keep an exponential moving average of the trained "
        "weights, with this decay per step (0: off; e.g. 0.998)",
        "optimisation",
    )
    patience: int = option(3, "early stopping: epochs without improvement", "optimisation")
    monitor: str = option(
        "val_acc", "what early stopping and the best epoch watch", "optimisation", choices=["val_acc", "val_loss"]
    )
    tta: bool = option(
        False, "horizontal-flip test-time augmentation in evaluation (recorded in the model)", "optimisation"
    )
    # runtime
    seed: int = option(42, "seed of the validation split, shuffling and augmentation")
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    precision: str = option(
        "auto",
        "training precision; auto: bf16/fp16 where the hardware is fast at it, else fp32",
        choices=["auto", "fp32", "bf16", "fp16"],
    )
    channels_last: bool = option(True, "channels-last memory format")
    workers: int = option(0, "DataLoader worker processes")
    sync_bn: bool = option(
        False, "with torchrun on CUDA: batch-norm statistics over all processes (docs/distributed-training.md)"
    )
    compile: bool = option(False, "torch.compile the model for training (compiles first; model files stay plain)")
    preset: str | None = option(None, "named recipe; explicit options override it", "data", cli=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if isinstance(values.get("data"), (str, os.PathLike)):  # one folder (and files written before sources)
            values["data"] = [str(values["data"])] if str(values["data"]) else []
        return cls(**values)

    @property
    def prefix_mode(self) -> bool:
        """Fine-tuning the last stages on their cached input (see `cached_prefix`)."""
        return self.cached_prefix and not self.frozen_features and self.trainable_stages > 0

    @property
    def embeds_once(self) -> bool:
        """The epoch loop trains on outputs of a fixed network computed once (frozen features, or
        the cached prefix), not on images."""
        return self.frozen_features or self.prefix_mode


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
    # The earlier best recipe on ImageNet weights (docs/recipes.md, "The comparison"): EfficientNet-Lite0
    # on aligned faces with the visible region, strong augmentation, cosine schedule.
    "imagenet": {
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
    # Measured best (docs/recipes.md), and what `facegender train` uses without --preset: dlib's
    # face-recognition ResNet on dlib chips of the aligned faces (the whole chip), its last two
    # stages (layer4, fc) and a new head fine-tuned on the cached output of the frozen first ones
    # (4 views an image: itself, its mirror image, two strong jitters), the decision threshold
    # set for equal recall of both classes on validation.
    "best": {
        "backbone": "dlib_resnet",
        "image_size": 150,
        "align": True,
        "visible_region": False,
        "frozen_features": False,
        "trainable_stages": 2,
        "cached_prefix": True,
        "feature_views": 4,
        "augment": "strong",
        "epochs": 8,
        "patience": 3,
        "batch_size": 64,
        "lr": 1e-3,
        "body_lr_scale": 0.3,
        "optimizer": "adamw",
        "weight_decay": 1e-4,
        "monitor": "val_loss",
        "tta": True,
    },
    # The bundled recipe before fine-tuning: a linear head on dlib's frozen descriptor, trained on
    # the embeddings of each image and its mirror image (a model file of a few KB).
    "frozen": {
        "backbone": "dlib_resnet",
        "image_size": 150,
        "align": True,
        "visible_region": False,
        "frozen_features": True,
        "feature_views": 2,
        "epochs": 30,
        "patience": 6,
        "batch_size": 64,
        "lr": 1e-2,
        "optimizer": "adamw",
        "weight_decay": 1e-4,
        "monitor": "val_loss",
        "tta": True,
    },
    # The plain dataclass defaults: EfficientNet-Lite0 (ImageNet) on the whole image, the course
    # report's augmentation and optimiser (facegender's default before the face backbone).
    "plain": {},
}

#: The recipe of `facegender train` and `facegender.train(...)` when no preset is named.
DEFAULT_PRESET = "best"


def build_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "image_size" not in values and values.get("backbone") in NATIVE_SIZE:
        values["image_size"] = NATIVE_SIZE[values["backbone"]]
    cfg = TrainConfig.from_dict(values)
    validate(cfg)
    return cfg


#: Backbones trained on one input size only (the default image_size otherwise is TrainConfig's).
NATIVE_SIZE = {"dlib_resnet": 150}


def validate(cfg: TrainConfig) -> None:
    problems = []
    if not 0.0 <= cfg.val_fraction < 1.0:
        problems.append(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction == 0.0 and not cfg.val_on_test:
        problems.append("--val-fraction 0 needs --val-on-test (something must choose the best epoch)")
    if cfg.cv_fold and not (cfg.cv_folds >= 2 and 1 <= cfg.cv_fold <= cfg.cv_folds and not cfg.val_on_test):
        problems.append(
            f"cross-validation fold {cfg.cv_fold} of {cfg.cv_folds}: need 2 or more folds, "
            "fold between 1 and the number of folds, and no --val-on-test"
        )
    if cfg.monitor not in ("val_acc", "val_loss"):
        problems.append(f"--monitor must be val_acc or val_loss, got {cfg.monitor!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.patience < 1:
        problems.append("--epochs, --batch-size and --patience must be at least 1")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        problems.append(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.augment not in ("report", "strong", "light", "none"):
        problems.append(f"--augment must be report, strong, light or none, got {cfg.augment!r}")
    if not 0.0 <= cfg.ema < 1.0:
        problems.append(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.feature_views < 1:
        problems.append(f"--feature-views must be at least 1, got {cfg.feature_views}")
    if cfg.optimizer not in ("adam", "adamw"):
        problems.append(f"--optimizer must be adam or adamw, got {cfg.optimizer!r}")
    if cfg.balance == "group" and not cfg.balance_column:
        problems.append("--balance group needs --balance-column COLUMN (a manifest.csv column, or 'source')")
    if cfg.scheduler not in ("none", "cosine"):
        problems.append(f"--scheduler must be none or cosine, got {cfg.scheduler!r}")
    if problems:
        raise ConfigError("; ".join(problems))
