"""Training on several processes or machines with torch.distributed (DistributedDataParallel).

`torchrun --nproc_per_node=N -m facegender train ...` starts N copies of the usual command. Each
one finds RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment (torchrun
sets them; `env://` initialisation), joins the process group (NCCL on CUDA, Gloo on CPU) and
trains on its share of the training images. Without WORLD_SIZE, or with WORLD_SIZE=1, every
function here does nothing and training is the single-process run.

What a distributed run means (docs/distributed-training.md says it for users):

- `--batch-size` is per process, as usual under torchrun: the global batch is N x batch size and
  `--lr` is used as given (scale it yourself if you want the linear-scaling rule).
- The training images are split between the processes by a DistributedSampler seeded with
  `--seed` and reshuffled every epoch (`set_epoch`). It pads the last share by repeating a few
  images so every process runs the same number of steps; train loss and accuracy count those.
- Validation is split between the processes *without* padding (process r takes images r, r+N,
  ...) and the logits are gathered back into the original order, so validation metrics are
  exactly those of a single process. The final test evaluation runs on rank 0 alone.
- Only rank 0 prints, shows progress bars and writes files. Early stopping is decided on rank 0
  and broadcast, so all processes stop after the same epoch.
- Checkpoints hold the unwrapped model (no `module.` or `_orig_mod.` prefixes), so a run can be
  resumed with any number of processes, including one; the per-step learning-rate schedule is
  re-aligned to the new number of steps per epoch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from facegender.core.errors import ConfigError
from facegender.training import engine

#: How long a process waits for the others in one collective call. Ranks other than 0 wait in one
#: while rank 0 runs the final test evaluation and writes the reports, hence generous.
TIMEOUT = timedelta(minutes=60)


@dataclass
class DistContext:
    """Where this process stands in the run: its rank, the number of processes and its device."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device | None = None  # None: single process, the caller picks the device
    owns_group: bool = False  # True when `setup` created the process group (and `cleanup` ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset), with a clear error for a bad value."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not a number; start the run with torchrun") from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device of the process with `local_rank` for `--device name` in a distributed run."""
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ConfigError(
                    f"LOCAL_RANK {local_rank} but only {count} GPU(s) visible on this machine; "
                    f"start at most {count} processes per node (--nproc_per_node)"
                )
            return torch.device("cuda", local_rank)
        if name == "cuda":
            raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(
        f"--device {name}: with several processes each one uses its own GPU, cuda:LOCAL_RANK "
        "(--device auto or cuda), or the CPU (--device cpu); choose the GPUs with "
        "CUDA_VISIBLE_DEVICES instead"
    )


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op context otherwise.

    A process group that the caller already initialised is used as it is (and left to the caller)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world <= 1:
            return DistContext()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistContext(world, rank, local_rank, device, owns_group=False)
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={world} but {var} is not set; start the run with torchrun "
                "(e.g. torchrun --nproc_per_node=2 -m facegender train ...)"
            )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method="env://", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", init_method="env://", timeout=TIMEOUT)
    return DistContext(world, rank, local_rank, device, owns_group=True)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group `setup` created (called on success and on errors)."""
    import torch.distributed as dist

    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model


def prepare_model(model: nn.Module, ctx: DistContext, sync_bn: bool = False, compile: bool = False) -> nn.Module:
    """The module to train: `model` wrapped in DistributedDataParallel (when distributed, with
    SyncBatchNorm if asked) and torch.compile (if asked). `model` itself stays the plain module that
    owns the same parameters; evaluation and checkpoints use it."""
    if ctx.enabled:
        if sync_bn:
            if ctx.device.type != "cuda":
                raise ConfigError(
                    "--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU); leave it off for CPU runs"
                )
            # the same root, new BN children; a frozen stem's FrozenBatchNorm2d layers stay as they are
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
    if compile:
        model = torch.compile(model)
    return model


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- data


def train_sampler(dataset, ctx: DistContext, seed: int):
    """A seeded DistributedSampler for the training set (None in a single process). Call its
    `set_epoch(epoch)` before every epoch so each epoch has its own shuffle."""
    if not ctx.enabled:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=False
    )


def shard_sampler(n: int, ctx: DistContext):
    """This process's share of an evaluation set of `n` items, without padding: indices rank,
    rank + N, rank + 2N, ... (None in a single process)."""
    if not ctx.enabled:
        return None
    return range(ctx.rank, n, ctx.world_size)


def interleave(shards: list[torch.Tensor], n: int) -> torch.Tensor:
    """Undo `shard_sampler`: shard r holds items r, r + N, ...; returns the n items in order."""
    world = len(shards)
    pieces = [s for s in shards if s.numel()]
    if not pieces:
        return shards[0]
    out = torch.empty((n, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
    for r, shard in enumerate(shards):
        expected = len(range(r, n, world))
        if shard.shape[0] != expected:
            raise RuntimeError(f"rank {r} evaluated {shard.shape[0]} items, expected {expected}")
        if expected:
            out[r::world] = shard
    return out


# ----------------------------------------------------------------------------- collectives


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's `obj`, in rank order (just [obj] in a single process)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every process (`obj` itself in a single process)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def evaluate(
    model: nn.Module,
    loader,
    criterion,
    device: torch.device,
    precision: str,
    channels_last: bool,
    ctx: DistContext,
    desc: str = "validate",
    progress: bool = True,
) -> dict:
    """`engine.evaluate` over the whole set: each process predicts its shard (`loader` built with
    `shard_sampler`) with the plain module, the logits are gathered in order, and every process
    computes the same, exact loss and accuracy: those of rank 0's model, the one it saves."""
    if not ctx.enabled:
        return engine.evaluate(model, loader, criterion, device, precision, channels_last, desc=desc, progress=progress)
    plain = plain_module(model)
    sync_buffers(plain, ctx)
    logits, labels = engine.predict_logits(
        plain, loader, device, precision, channels_last, desc=desc, progress=progress
    )
    n = len(loader.dataset)
    parts = gather_objects((logits, labels), ctx)
    logits = interleave([p[0] for p in parts], n)
    labels = interleave([p[1] for p in parts], n)
    return engine.summarize_logits(logits, labels, criterion)


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every process. DDP sends them at the
    start of each training step, but each process then updates its own copy with its own batch."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def reduce_train_stats(stats: dict, ctx: DistContext) -> dict:
    """Loss and accuracy over all processes' images (weighted by count), total images, the slowest
    process's time, and the resulting global images per second."""
    if not ctx.enabled:
        return stats
    import torch.distributed as dist

    n = stats["n"]
    sums = torch.tensor([stats["loss"] * n, round(stats["acc"] * n), n], dtype=torch.float64, device=ctx.device)
    seconds = torch.tensor([stats["seconds"]], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    loss_sum, correct, total = sums.tolist()
    secs = seconds.item()
    total_n = int(total)
    return {
        **stats,
        "loss": loss_sum / max(total_n, 1),
        "acc": correct / max(total_n, 1),
        "n": total_n,
        "seconds": secs,
        "images_per_sec": total_n / secs if secs > 0 else 0.0,
    }


def sync_early_stopping(stopper: engine.EarlyStopping, improved: bool, ctx: DistContext) -> bool:
    """Rank 0's early-stopping state and 'improved' flag on every process, so all stop together."""
    if not ctx.enabled:
        return improved
    state, improved = broadcast_object((stopper.state_dict(), improved), ctx)
    stopper.load_state_dict(state)
    return improved


# ----------------------------------------------------------------------------- randomness and schedules


def decorrelate_rng(ctx: DistContext, seed: int, epoch: int) -> None:
    """Give ranks other than 0 their own random streams (augmentation, dropout) so the processes do
    not draw the same augmentations; rank 0 keeps the single-process stream."""
    if ctx.rank == 0:
        return
    engine.seed_everything(seed + 1_000_003 * ctx.rank + epoch)


def schedule_at(make: Callable[[torch.optim.Optimizer], Any], optimizer: torch.optim.Optimizer, step: int):
    """A new learning-rate schedule `make(optimizer)` advanced to `step`, the optimizer's learning
    rates set to match: where a resumed run continues. Counting steps from the epoch (not loading
    the saved position) keeps the schedule at the same epoch when the number of processes, and so
    the steps per epoch, changed."""
    scheduler = make(optimizer)  # starts from each group's `initial_lr`, restored with the optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
        for _ in range(step):
            scheduler.step()
    return scheduler
