"""`facegender train`: fine-tune an ImageNet backbone on DATASET/train, pick the best epoch on a
validation split, evaluate once on DATASET/test, and write everything into the run folder."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from facegender.core import files
from facegender.core.errors import ConfigError, FacegenderError
from facegender.core.model import load
from facegender.core.preprocessing import ImagePreparer, Preprocessing, visible_region
from facegender.data.dataset import DatasetError, ImageLoader, LoadedSplit, fold_split, load_split, split_train_val
from facegender.data.sources import (
    ScannedSources,
    describe_sources,
    read_sources,
    sample_weights,
    scan_sources,
    split_groups,
)
from facegender.evaluation.evaluate import compute_metrics, write_evaluation
from facegender.evaluation.metrics import fit_temperature
from facegender.evaluation.plots import plot_curves
from facegender.evaluation.predictions import predict_labelled
from facegender.evaluation.report import write_run_report
from facegender.training import checkpoint as ckpt
from facegender.training import distributed
from facegender.training.backbones import build_model, freeze_body, freeze_stem, get_spec, split_body
from facegender.training.config import DEFAULT_PRESET, TrainConfig, build_config
from facegender.training.engine import (
    EarlyStopping,
    EpochWeightedSampler,
    FaceDataset,
    WeightAverage,
    make_loader,
    seed_everything,
    select_device,
    select_precision,
    train_one_epoch,
)
from facegender.training.features import FeatureExtractor, feature_dataset
from facegender.training.transforms import EvalPreset, TrainPreset

BEST_MODEL, CHECKPOINT = files.BEST_MODEL, files.CHECKPOINT


class TrainingInterrupted(FacegenderError):
    """Ctrl-C during training; the files of the last finished epoch are intact."""

    exit_code = 130


@dataclass
class RunData:
    classes: list[str]
    scanned: ScannedSources
    prep: Preprocessing
    loader: ImageLoader
    train: LoadedSplit
    val: LoadedSplit
    test: LoadedSplit | None


def preprocessing_for(cfg: TrainConfig, prepared: dict | None = None) -> Preprocessing:
    """The recorded preprocessing. `prepared` (the marker of a `facegender prepare` folder) records
    the face stage that folder's images already went through, crop size included (the crop is then
    resized to image_size, as in training), so predict aligns new photos alike."""
    spec = get_spec(cfg.backbone)
    face = None
    if prepared is not None:
        from facegender.core.faces.align import FaceAlignConfig

        face = FaceAlignConfig.from_dict(prepared["face"]).to_dict()
    elif cfg.align:
        from facegender.core.faces.align import FaceAlignConfig

        face = FaceAlignConfig.from_dict({"size": cfg.image_size, **spec.face, **(cfg.face or {})}).to_dict()
    return Preprocessing(image_size=cfg.image_size, mean=spec.mean, std=spec.std, face=face)


def prepare_data(
    cfg: TrainConfig, scanned: ScannedSources, log: Callable[[str], None] = print, progress: bool = True
) -> RunData:
    """Split off validation from the scanned sources and read every image once (failing on bad files)."""
    classes, train_split, test_split = scanned.classes, scanned.train, scanned.test
    if cfg.val_on_test:
        log(
            "WARNING: --val-on-test: the best epoch and early stopping are chosen on the test set, as in the "
            "course report. The test accuracy is then optimistic; the default validation split is honest."
        )
        val_split = test_split
    elif cfg.cv_fold:  # `facegender cv`: this fold of a stratified k-fold split validates
        train_split, val_split = fold_split(train_split, cfg.cv_folds, cfg.cv_fold, cfg.seed)
    else:
        train_split, val_split = split_train_val(
            train_split, cfg.val_fraction, cfg.seed, split_groups(scanned.sources, train_split)
        )
    prepared = prepared_marker(cfg, scanned)
    prep = preprocessing_for(cfg, prepared)
    if prepared is not None:  # already aligned by `facegender prepare`: record the face stage, only resize
        log(
            f"note: {', '.join(cfg.data)} hold(s) faces aligned by `facegender prepare`; the model records that "
            "face stage and training only resizes them" + (" (--align is not applied twice)" if cfg.align else "")
        )
        loader = ImageLoader(ImagePreparer(dataclasses.replace(prep, face=None)))
    else:
        loader = ImageLoader(ImagePreparer(prep))
    # Frozen features and the cached prefix read each image once more to embed it, so the decoded
    # images are not kept: memory then does not grow with the training set.
    keep = cfg.cache and not cfg.embeds_once
    read = dict(loader=loader, keep=keep, skip_bad=cfg.skip_bad, progress=progress)
    train = load_split(train_split, desc="reading train images", **read)
    val = load_split(val_split, desc="reading validation images", **read)
    test = val if cfg.val_on_test else load_split(test_split, desc="reading test images", **read)
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if part.bad:
            log(f"WARNING: --skip-bad: left out {len(part.bad)} unreadable {name} file(s):")
            for line in part.bad:
                log(f"  - {line}")
        if cfg.align and part.no_face:
            log(f"note: no face found in {len(part.no_face)} {name} image(s); used centred and padded")
    if len(train.split) == 0:
        raise DatasetError("no readable training images left")
    if prep.face is not None and cfg.visible_region:
        prep = dataclasses.replace(prep, visible=training_visible_region(train, loader, prep))
        if prep.visible is not None:
            log(
                "face crops: training images fill only part of the aligned crop; keeping the part filled in "
                f"at least half of them, x {prep.visible[0]:.2f}-{prep.visible[2]:.2f}, "
                f"y {prep.visible[1]:.2f}-{prep.visible[3]:.2f} of the crop, in training and prediction"
            )
    return RunData(classes, scanned, prep, loader, train, val, test)


def prepared_marker(cfg: TrainConfig, scanned: ScannedSources) -> dict | None:
    """The `facegender prepare` marker that every source shares (None: none has one), checked
    against the face crops the backbone wants."""
    from facegender.data.prepare import read_marker

    markers = [read_marker(s.path) for s in scanned.sources]
    if any(m != markers[0] for m in markers):
        raise DatasetError(
            "some sources hold faces aligned by `facegender prepare` and others not (or with other "
            "settings): train on the original images of all of them, with --align"
        )
    prepared = markers[0]
    if prepared is not None:
        wanted = get_spec(cfg.backbone).face.get("template", "arcface")
        have = prepared["face"].get("template", "arcface")
        if have != wanted:
            raise DatasetError(
                f"{', '.join(cfg.data)} holds faces aligned by `facegender prepare` with the {have} "
                f"template, but {cfg.backbone} wants {wanted} crops: run `facegender prepare --template "
                f"{wanted}` on the original images, or train on them directly with --align"
            )
    return prepared


def averaged(average: WeightAverage | None):
    """The weight average applied for a while (nothing without --ema)."""
    return average.applied() if average is not None else contextlib.nullcontext()


def training_sets(
    cfg: TrainConfig, model: nn.Module, data: RunData, weights_source: str, device, progress: bool = True
):
    """(the module the epoch loop trains, training set, validation set, views per training image).

    Frozen features: the head, on the body's embeddings. Fine-tuning the last stages on a cached
    prefix: those stages and the head, on the frozen first stages' feature maps. Otherwise the
    whole model, on augmented images."""
    if not cfg.embeds_once:
        return (
            model,
            FaceDataset(data.train, TrainPreset(data.prep, cfg.augment), data.loader),
            FaceDataset(data.val, EvalPreset(data.prep), data.loader),
            1,
        )
    body_id = weights_source if cfg.pretrained else f"random weights, seed {cfg.seed}"
    if cfg.prefix_mode:  # (split_body says which option to change for a backbone without stages)
        frozen, trained = split_body(model, cfg.trainable_stages, cfg.backbone)
        extractor = FeatureExtractor(
            frozen,
            data.prep,
            f"{body_id}; all but the last {cfg.trainable_stages} stages",
            device,
            augment=cfg.augment,
            dtype=np.float16,
        )
        what = "frozen stages of"
    else:
        trained, extractor, what = model.head, FeatureExtractor(model.body, data.prep, body_id, device), "embedding"
    train_set = feature_dataset(
        extractor.embed(
            _Images(data.train, data.loader), cfg.feature_views, f"{what} train images", progress, to_disk=True
        ),
        data.train.split.labels,
    )
    val_set = feature_dataset(
        extractor.embed(_Images(data.val, data.loader), 1, f"{what} validation images", progress, to_disk=True),
        data.val.split.labels,
    )
    return trained, train_set, val_set, cfg.feature_views


def train_sampler(cfg: TrainConfig, data: RunData, views: int, ctx: distributed.DistContext):
    """The epoch's sampler: weighted by source and --balance (each view of an image weighs as the
    image), DistributedSampler's shards with torchrun, or None (a seeded shuffle)."""
    weights = sample_weights(data.scanned.sources, data.train.split, cfg.balance, cfg.balance_column)
    if weights is None:
        return distributed.train_sampler(range(len(data.train.split) * views), ctx, cfg.seed)
    if ctx.enabled:
        raise ConfigError("source weights and --balance are not supported with torchrun yet; train in one process")
    return EpochWeightedSampler(np.repeat(weights, views), cfg.seed)


class _Images(Sequence):
    """The prepared uint8 images of a split: kept in memory, or read again on access."""

    def __init__(self, loaded: LoadedSplit, loader: ImageLoader):
        self.loaded, self.loader = loaded, loader

    def __len__(self) -> int:
        return len(self.loaded.split)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.loaded.images is not None:
            return self.loaded.images[i]
        return self.loader(self.loaded.split.paths[i])[0]


def training_visible_region(train, loader, prep: Preprocessing, limit: int = 512):
    """`core.preprocessing.visible_region` of (at most `limit`, evenly spaced) training crops."""
    step = max(1, len(train.split) // limit)
    if train.images is not None:
        images = train.images[::step]
    else:
        images = [loader(path)[0] for path in train.split.paths[::step]]
    return visible_region(images, prep.pad_color)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam(W) over the trainable parameters; the body's at `lr * body_lr_scale` (discriminative
    learning rates: the pretrained body moves less than the new head)."""
    body = getattr(model, "body", None)
    body_ids = {id(p) for p in body.parameters()} if body is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in body_ids], "lr": cfg.lr}]
    body_params = [p for p in trainable if id(p) in body_ids]
    if body_params:
        groups.insert(0, {"params": body_params, "lr": cfg.lr * cfg.body_lr_scale})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Per-step schedule: linear warm-up over `warmup_epochs`, then cosine decay to 0 at the end of
    `epochs` (torch's LinearLR then CosineAnnealingLR in a SequentialLR); None: constant lr."""
    if cfg.scheduler == "none":
        return None
    sched = torch.optim.lr_scheduler
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    if warmup == 0:
        return sched.CosineAnnealingLR(optimizer, T_max=total)
    linear = sched.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    cosine = sched.CosineAnnealingLR(optimizer, T_max=total - warmup)
    return sched.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


#: The loss/accuracy curves are redrawn at most this often during training (and after the last
#: epoch): drawing them takes about a second, longer than a whole epoch of frozen-feature training.
PLOT_EVERY_S = 30.0


def write_history(history: list[dict], out: Path, best_epoch: int | None, val_name: str, plots: bool = True) -> None:
    """summary.csv (every call) and, with `plots`, the loss and accuracy curves."""
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    files.write_text_atomic(buf.getvalue(), out / files.SUMMARY_CSV)
    if not plots:
        return
    plot_curves(history, "loss", out / "loss_curve.png", "Loss per epoch", best_epoch, val_name)
    plot_curves(history, "acc", out / "accuracy_curve.png", "Accuracy per epoch", best_epoch, val_name)


def resume_config(path: str, **overrides) -> tuple[TrainConfig, dict]:
    """The config and training state saved in gender_checkpoint.pth. The run continues in the
    checkpoint's folder; `overrides` that are not None (epochs, data, device, workers) replace saved values."""
    state = ckpt.load_file(path)
    if "optimizer_state" not in state:
        raise ckpt.CheckpointError(f"{path}: holds no training state; resume from {CHECKPOINT}")
    values = {**state["config"], "out": str(Path(path).parent)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values), state


def train(
    cfg: TrainConfig, state: dict | None = None, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Train, select, evaluate; returns the run summary (also in metrics.json). `state` (from
    `resume_config`) continues an interrupted run. Raises TrainingInterrupted on Ctrl-C after
    saying how to resume.

    Started by torchrun (WORLD_SIZE > 1), every process calls this and they train together with
    DistributedDataParallel; only rank 0 logs and writes files (see training.distributed)."""
    ctx = distributed.setup(cfg.device)
    try:
        if not ctx.is_main:
            log, progress = (lambda s: None), False
        return _train(cfg, state, log, progress, ctx)
    finally:
        distributed.cleanup(ctx)


@dataclass
class TrainingRun:
    """What the steps of `_train` pass on to each other (torchvision-references style: set up, then
    per epoch train, validate, save): the run's settings, its model and data, the epoch loop's
    pieces and the state a checkpoint records."""

    cfg: TrainConfig
    ctx: distributed.DistContext
    device: torch.device
    precision: str  # training precision (validation is always fp32)
    channels_last: bool  # for the epoch loop's inputs
    model: nn.Module  # the whole classifier, as the model files hold it
    weights_source: str
    data: RunData
    trained: nn.Module  # the module the epoch loop trains (the model, its head or last stages)
    sampler: object
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    val_criterion: nn.Module
    stopper: EarlyStopping
    average: WeightAverage | None
    net: nn.Module | None = None  # `trained` as the loop runs it: DDP / compiled
    history: list[dict] = dataclasses.field(default_factory=list)
    start_epoch: int = 1

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def val_name(self) -> str:
        return "test (--val-on-test)" if self.cfg.val_on_test else "validation"

    def record(self, epoch: int, **extra) -> dict:
        """A model file's content at `epoch` (checkpoint.model_record), with `extra` entries."""
        return ckpt.model_record(
            self.model, self.cfg.to_dict(), self.data.classes, self.data.prep, self.weights_source, epoch=epoch, **extra
        )


def _train(
    cfg: TrainConfig, state: dict | None, log: Callable[[str], None], progress: bool, ctx: distributed.DistContext
) -> dict:
    run = setup_run(cfg, ctx, log, progress)
    if state is not None:
        resume_run(run, state, log)
    prepare_loop_model(run, log)
    start_run_folder(run, log)
    started = time.perf_counter()
    run_epochs(run, log, progress)
    if not ctx.is_main:  # rank 0 alone evaluates the best epoch on test and writes the reports
        return distributed.broadcast_object(None, ctx)
    summary = finish(
        cfg,
        run.out,
        run.data,
        run.device,
        run.precision,
        run.channels_last,
        run.history,
        run.stopper,
        started,
        log,
        progress,
    )
    return distributed.broadcast_object(summary, ctx)


def setup_run(
    cfg: TrainConfig, ctx: distributed.DistContext, log: Callable[[str], None], progress: bool
) -> TrainingRun:
    """Seed, pick the device, build the model, read the data and make the epoch loop's loaders,
    optimizer, schedule, losses, early stopping and weight average (a fresh run, before any resume)."""
    seed_everything(cfg.seed)
    device = ctx.device or select_device(cfg.device)
    precision = select_precision(cfg.precision, device)
    channels_last = cfg.channels_last and device.type != "mps"
    scanned = scan_sources(read_sources(cfg.data), cfg.seed)  # layout fails fast, before images are read
    model, weights_source = build_run_model(cfg, len(scanned.classes), device, channels_last, log)
    data = prepare_data(cfg, scanned, log, progress)
    trained, train_set, val_set, views = training_sets(cfg, model, data, weights_source, device, progress)
    if trained is not model:
        channels_last = False  # (only for the epoch loop: inputs are cached vectors or feature maps)
    sampler = train_sampler(cfg, data, views, ctx)
    train_loader = make_loader(
        train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed, sampler=sampler
    )
    val_loader = make_loader(
        val_set, cfg.batch_size * 2, False, cfg.workers, sampler=distributed.shard_sampler(len(val_set), ctx)
    )
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    return TrainingRun(
        cfg=cfg,
        ctx=ctx,
        device=device,
        precision=precision,
        channels_last=channels_last,
        model=model,
        weights_source=weights_source,
        data=data,
        trained=trained,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        val_criterion=nn.CrossEntropyLoss(),
        stopper=EarlyStopping(cfg.patience, "max" if cfg.monitor == "val_acc" else "min"),
        average=WeightAverage(trained, cfg.ema) if cfg.ema else None,
    )


def build_run_model(
    cfg: TrainConfig, num_classes: int, device, channels_last: bool, log: Callable[[str], None]
) -> tuple[nn.Module, str]:
    """(the classifier, where its body's weights come from): built, frozen as the options say and
    moved to `device`."""
    model, weights_source = build_model(cfg.backbone, num_classes, cfg.dropout, cfg.pretrained, cfg.weights)
    if not cfg.pretrained:
        log("WARNING: --no-pretrained: training from random weights (recorded in the model file).")
    if cfg.frozen_features:
        freeze_body(model, 0, cfg.backbone)
    elif cfg.trainable_stages >= 0:
        freeze_body(model, cfg.trainable_stages, cfg.backbone)
    elif cfg.freeze_stem:
        freeze_stem(model, cfg.backbone)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, weights_source


def resume_run(run: TrainingRun, state: dict, log: Callable[[str], None]) -> None:
    """Continue from `state` (gender_checkpoint.pth): model, optimizer, schedule, early stopping,
    weight average, history and random state as they were after its epoch."""
    run.model.load_state_dict(state["model_state"], strict=state.get("body_weights") != "pretrained")
    run.optimizer.load_state_dict(state["optimizer_state"])
    if run.scheduler is not None and state.get("scheduler_state"):  # at the same epoch, for any process count
        steps = len(run.train_loader)
        run.scheduler = distributed.schedule_at(
            lambda opt: make_scheduler(run.cfg, opt, steps), run.optimizer, state["epoch"] * steps
        )
    run.stopper.load_state_dict(state["early_stopping"])
    if run.average is not None and state.get("ema_state"):
        run.average.load_state_dict(state["ema_state"])
    run.history = list(state["history"])
    run.start_epoch = state["epoch"] + 1
    ckpt.set_rng_state(state["rng_state"])
    log(f"Resuming {run.out / CHECKPOINT} after epoch {state['epoch']} (best so far: epoch {run.stopper.best_epoch}).")


def prepare_loop_model(run: TrainingRun, log: Callable[[str], None]) -> None:
    """Give each process its own random stream and wrap the trained module for the loop (DDP,
    torch.compile); the plain module stays in `run.trained`."""
    cfg, ctx = run.cfg, run.ctx
    distributed.decorrelate_rng(ctx, cfg.seed, run.start_epoch)
    run.net = distributed.prepare_model(run.trained, ctx, cfg.sync_bn, cfg.compile)
    if ctx.enabled:
        log(
            f"DistributedDataParallel: {ctx.world_size} processes x batch {cfg.batch_size} = global batch "
            f"{ctx.world_size * cfg.batch_size}{', SyncBatchNorm' if cfg.sync_bn else ''}"
        )
    elif cfg.sync_bn:
        log("note: --sync-bn has no effect in a single process")


def start_run_folder(run: TrainingRun, log: Callable[[str], None]) -> None:
    """Create the run folder, write config.yaml (rank 0) and say what is trained on what."""
    cfg, data = run.cfg, run.data
    run.out.mkdir(parents=True, exist_ok=True)
    if run.ctx.is_main:
        files.write_text_atomic(
            yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), run.out / files.CONFIG_YAML
        )
    pretrained_on = get_spec(cfg.backbone).pretrained_on
    log(
        f"{cfg.backbone} ({pretrained_on + ': ' + run.weights_source if cfg.pretrained else 'random weights'}"
        f"{', frozen: training the head on embeddings' if cfg.frozen_features else ''}) on {run.device}, "
        f"{run.precision}{', channels_last' if run.channels_last else ''}; classes {data.classes}; "
        f"train {len(data.train.split)}, {run.val_name} {len(data.val.split)}, "
        f"test {len(data.test.split) if data.test else 0} images"
    )


def run_epochs(run: TrainingRun, log: Callable[[str], None], progress: bool) -> None:
    """Epochs start_epoch..epochs, until early stopping; each ends with its files saved (rank 0).
    Ctrl-C: `interrupted`."""
    epoch = run.start_epoch - 1
    last_plot = time.perf_counter()
    try:
        for epoch in range(run.start_epoch, run.cfg.epochs + 1):
            if run.stopper.should_stop:
                break
            tr = train_epoch(run, epoch, progress)
            va = validate(run, progress)
            improved = record_epoch(run, epoch, tr, va, log)
            if run.ctx.is_main:
                save_epoch(run, epoch, va, improved)
                last_plot = write_epoch_history(run, epoch, last_plot)
    except KeyboardInterrupt:
        interrupted(run, epoch, log)


def train_epoch(run: TrainingRun, epoch: int, progress: bool) -> dict:
    """One epoch of training, in the epoch's seeded order; its loss, accuracy and speed over all processes."""
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)  # the same seeded shuffle for any process count: seed + epoch
    else:
        run.train_loader.generator.manual_seed(run.cfg.seed + epoch)
    tr = train_one_epoch(
        run.net,
        run.train_loader,
        run.criterion,
        run.optimizer,
        run.device,
        run.precision,
        run.scaler,
        run.channels_last,
        run.scheduler,
        desc=f"epoch {epoch}/{run.cfg.epochs}",
        progress=progress,
        on_step=run.average.update if run.average is not None else None,
    )
    return distributed.reduce_train_stats(tr, run.ctx)


def validate(run: TrainingRun, progress: bool) -> dict:
    """Loss and accuracy on the validation set, in fp32 whatever the training precision: the
    metrics that choose the best epoch must not depend on the CPU model (bf16 autocast is on by
    default where AMX makes it fast). With --ema the average is validated (and saved as the best model)."""
    with averaged(run.average):
        return distributed.evaluate(
            run.trained,
            run.val_loader,
            run.val_criterion,
            run.device,
            "fp32",
            run.channels_last,
            run.ctx,
            desc="validate",
            progress=progress,
        )


def record_epoch(run: TrainingRun, epoch: int, tr: dict, va: dict, log: Callable[[str], None]) -> bool:
    """Add the epoch to the history, step early stopping (rank 0 decides for all) and log the
    epoch's line; whether it is the best so far."""
    run.history.append(
        {
            "epoch": epoch,
            "train_loss": round(tr["loss"], 6),
            "train_acc": round(tr["acc"], 6),
            "val_loss": round(va["loss"], 6),
            "val_acc": round(va["acc"], 6),
            "lr": run.optimizer.param_groups[0]["lr"],
            "images_per_sec": round(tr["images_per_sec"], 2),
            "seconds": round(tr["seconds"], 1),
        }
    )
    improved = run.stopper.step(va["acc"] if run.cfg.monitor == "val_acc" else va["loss"], epoch)
    improved = distributed.sync_early_stopping(run.stopper, improved, run.ctx)
    log(
        f"epoch {epoch:3d}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
        f"{'val' if not run.cfg.val_on_test else 'test'} loss {va['loss']:.4f} acc {va['acc']:.4f}  "
        f"{tr['images_per_sec']:.1f} img/s{'  * best' if improved else ''}"
    )
    return improved


def save_epoch(run: TrainingRun, epoch: int, va: dict, improved: bool) -> None:
    """best_model.pth when the epoch improved, and gender_checkpoint.pth with all that resuming
    needs; each written to a temporary file first and moved into place (checkpoint.save_atomic)."""
    if improved:
        with averaged(run.average):
            ckpt.save_atomic(
                run.record(epoch, metrics={"val_acc": va["acc"], "val_loss": va["loss"]}), run.out / BEST_MODEL
            )
    ckpt.save_atomic(
        run.record(
            epoch,
            optimizer_state=run.optimizer.state_dict(),
            scheduler_state=run.scheduler.state_dict() if run.scheduler is not None else None,
            ema_state=run.average.state_dict() if run.average is not None else None,
            history=run.history,
            early_stopping=run.stopper.state_dict(),
            rng_state=ckpt.rng_state(),
            world_size=run.ctx.world_size,
        ),
        run.out / CHECKPOINT,
    )


def write_epoch_history(run: TrainingRun, epoch: int, last_plot: float) -> float:
    """summary.csv, and the curves after the last epoch or PLOT_EVERY_S after they were last drawn;
    when they were last drawn."""
    last_epoch = run.stopper.should_stop or epoch == run.cfg.epochs
    plotted = last_epoch or time.perf_counter() - last_plot >= PLOT_EVERY_S
    write_history(run.history, run.out, run.stopper.best_epoch, run.val_name, plots=plotted)
    return time.perf_counter() if plotted else last_plot


def interrupted(run: TrainingRun, epoch: int, log: Callable[[str], None]) -> None:
    """Ctrl-C during `epoch`: write the history of the finished epochs (rank 0), say how to resume
    and raise TrainingInterrupted. The model files of the last finished epoch are left intact."""
    out, stopper = run.out, run.stopper
    if run.ctx.is_main:
        write_history(run.history, out, stopper.best_epoch, run.val_name)
    last = run.history[-1]["epoch"] if run.history else None
    msg = f"Interrupted during epoch {epoch}. " + (
        f"{out / CHECKPOINT} and {out / BEST_MODEL} hold epoch {last} (best: {stopper.best_epoch}); "
        f"continue with: facegender train --resume {out / CHECKPOINT}"
        if last
        else "No epoch had finished."
    )
    log(msg)
    raise TrainingInterrupted(msg) from None


def finish(
    cfg: TrainConfig,
    out: Path,
    data: RunData,
    device,
    precision: str,
    channels_last: bool,
    history: list[dict],
    stopper: EarlyStopping,
    started: float,
    log,
    progress: bool,
) -> dict:
    """Best epoch: fit the temperature on validation, evaluate once on test, write the outputs.

    The best model is loaded as every command loads it (`core.model.load`: inference precision, not
    the training `precision`; `channels_last` is training's too), so the test numbers here are those
    `facegender evaluate` gives. The test set is inferred once; report.html uses those predictions."""
    model = load(out / BEST_MODEL, device=device, tta=cfg.tta, detect=False)
    best = ckpt.load_file(out / BEST_MODEL)
    val, val_metrics = _calibrated_validation(model, cfg, data, progress)
    best.update(temperature=val.temperature, tta=cfg.tta, threshold=val.threshold)
    best["metrics"] = {"best_epoch": stopper.best_epoch, "val": _brief(val_metrics)}
    test, test_metrics = _test_results(model, cfg, data, val, val_metrics, progress)
    if test_metrics is not None:
        best["metrics"]["test"] = _brief(test_metrics)
    splits = {"train": data.train.split, "validation": data.val.split}
    sources = describe_sources(data.scanned, {**splits, "test": data.test.split if data.test is not None else None})
    best["sources"] = sources
    ckpt.save_atomic(best, out / BEST_MODEL)
    summary = {
        "best_epoch": stopper.best_epoch,
        "epochs_run": len(history),
        "stopped_early": stopper.should_stop,
        "protocol": _protocol(cfg),
        "temperature": val.temperature,
        "threshold": val.threshold,
        "tta": cfg.tta,
        "skipped_files": len(data.train.bad) + len(data.val.bad) + (len(data.test.bad) if data.test else 0),
        "train_seconds": round(time.perf_counter() - started, 1),
        "validation": val_metrics,
        "test": test_metrics,
        "sources": sources,
        "by_source": {
            "validation": by_source(val, data.val.split, data),
            "test": by_source(test, data.test.split, data) if test is not None else None,
        },
    }
    write_evaluation(
        summary,
        test_metrics,
        data.classes,
        out,
        title="Test set" if not cfg.val_on_test else "Test set (also used for model selection)",
    )
    write_run_report(cfg, out, test, best, log)  # report.html: test metrics, calibration, groups, mistakes
    log(format_summary(summary, out))
    return summary


def _calibrated_validation(model, cfg: TrainConfig, data: RunData, progress: bool):
    """(validation predictions, their metrics): the temperature fitted and the decision threshold
    chosen on validation, both set on `model` and on the predictions."""
    val = predict_labelled(model, data.val, loader=data.loader, batch_size=cfg.batch_size * 2, progress=progress)
    model.temperature = val.temperature = fit_temperature(val.logits, val.labels) if len(val.labels) else 1.0
    model.threshold = val.threshold = decision_threshold(val, data.classes)
    return val, compute_metrics(val.logits, val.labels, data.classes, val.temperature, val.threshold)


def _test_results(model, cfg: TrainConfig, data: RunData, val, val_metrics: dict, progress: bool):
    """(test predictions, their metrics), inferred once; validation's with --val-on-test; (None, None)
    without a test set."""
    if cfg.val_on_test:
        return val, val_metrics
    if data.test is None:
        return None, None
    test = predict_labelled(model, data.test, loader=data.loader, batch_size=cfg.batch_size * 2, progress=progress)
    return test, compute_metrics(test.logits, test.labels, data.classes, val.temperature, val.threshold)


def _protocol(cfg: TrainConfig) -> str:
    """How validation was chosen, in words (summary.csv, metrics.json)."""
    if cfg.val_on_test:
        return "val-on-test (report)"
    if cfg.cv_fold:
        return f"cross-validation fold {cfg.cv_fold} of {cfg.cv_folds} as validation"
    return f"stratified {cfg.val_fraction:.0%} validation split"


def decision_threshold(val, classes: list[str]) -> float | None:
    """Two classes: the threshold on the calibrated probability of classes[1] that makes both
    classes' recall equal on validation (evaluation.metrics.equal_recall_threshold); else None (arg-max)."""
    from facegender.evaluation.metrics import equal_recall_threshold

    if len(classes) != 2 or not len(val.labels):
        return None
    return float(equal_recall_threshold(val.probs(), val.labels))


def by_source(pred, split, data: RunData) -> dict | None:
    """Accuracy and recall of each source's images (evaluation.metrics.per_group_metrics, 'source' column);
    None with a single source."""
    from facegender.evaluation.metrics import per_group_metrics

    if len(data.scanned.sources) < 2 or pred is None or not len(pred.labels):
        return None
    names = [data.scanned.sources[split.source_of(i)].name for i in range(len(split))]
    preds = pred.predicted()
    return per_group_metrics(pred.labels, preds, {"source": names}, data.classes, min_count=1)["source"]


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("n", "accuracy", "loss", "ece", "ece_calibrated") if k in m}


def format_summary(summary: dict, out: Path) -> str:
    val, test = summary["validation"], summary["test"]
    lines = [
        "",
        "=" * 64,
        f" Best epoch {summary['best_epoch']} of {summary['epochs_run']} run"
        f"{' (stopped early)' if summary['stopped_early'] else ''}; protocol: {summary['protocol']}",
    ]
    if summary["protocol"].startswith("val-on-test"):
        lines.append(f" test accuracy (also used for selection: optimistic)  {test['accuracy']:.4f}  (n={test['n']})")
    else:
        lines.append(f" validation accuracy  {val['accuracy']:.4f}  (n={val['n']})")
        if test:
            lines.append(
                f" test accuracy        {test['accuracy']:.4f}  (n={test['n']}, "
                f"95% CI {test['accuracy_ci'][0]:.3f}-{test['accuracy_ci'][1]:.3f})"
            )
    if test:
        fitted = (
            "validation had no mistakes: nothing to fit, left at 1"
            if val["accuracy"] == 1.0
            else "fitted on validation"
        )
        lines.append(
            f" test ECE {test['ece']:.4f} -> {test['ece_calibrated']:.4f} after temperature "
            f"{summary['temperature']:.3f} ({fitted})"
        )
    if summary.get("threshold") is not None:
        lines.append(
            f" decision threshold {summary['threshold']:.3f} on the probability of the second class "
            "(equal recall of both classes on validation)"
        )
    if summary["skipped_files"]:
        lines.append(f" skipped unreadable files: {summary['skipped_files']}")
    lines += [
        f" time: {summary['train_seconds']:.0f} s",
        f" files in {out}/:",
        f"   {BEST_MODEL} (best epoch, for evaluate/predict/serve/export), {CHECKPOINT} (resume),",
        "   summary.csv, config.yaml, loss_curve.png, accuracy_curve.png, confusion_matrix.png, metrics.json,"
        " report.html",
        "=" * 64,
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Python API


@dataclass
class TrainRun:
    """What `facegender.train(...)` returns: where the run's files are, and its numbers."""

    out: Path
    model_path: Path  # best_model.pth: `facegender.load(run.model_path)`
    summary: dict  # as in metrics.json: best epoch, protocol, validation and test metrics
    config: TrainConfig

    @property
    def metrics(self) -> dict:
        """{'validation': ..., 'test': ...} metrics of the best epoch (test None without a test set)."""
        return {"validation": self.summary["validation"], "test": self.summary["test"]}


def run(
    data: str | Path | list,
    preset: str | None = DEFAULT_PRESET,
    out: str | Path = "output",
    log: Callable[[str], None] = print,
    progress: bool = True,
    **overrides,
) -> TrainRun:
    """Train on `data` (DATASET/train/<class>/, DATASET/test/<class>/; or a list of sources, as
    repeated --data) into `out`, as `facegender train --data DATA --preset PRESET --out OUT` does;
    `overrides` are TrainConfig fields (`epochs=5`, `backbone="resnet18"`). This is
    `facegender.train(...)`."""
    sources = [str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)]
    cfg = build_config(preset, data=sources, out=str(out), **overrides)
    summary = train(cfg, log=log, progress=progress)
    return TrainRun(Path(cfg.out), Path(cfg.out) / BEST_MODEL, summary, cfg)
