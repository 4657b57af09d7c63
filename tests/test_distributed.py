"""Distributed training: the usual `facegender train` command started by torchrun with two CPU
processes (Gloo, loopback only), compared with a single process, and resumed with one process.

The helpers of distributed.py that need no process group are tested directly."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from facegender.training import checkpoint as ckpt
from facegender.training import distributed
from facegender.training.backbones import build_model
from facegender.training.config import build_config

# Per-process settings for both runs; the 2-process run uses half the batch so the global batch,
# and with it the number of optimizer steps per epoch, is the same as the 1-process run's.
# Random weights with the (default) frozen stem: 3 epochs learn the synthetic classes reliably,
# where a fully trained random network's batch-norm statistics are still too noisy after 2.
SETTINGS = dict(backbone="resnet18", pretrained=False, image_size=64, epochs=3, lr=1e-3)
BATCH = 16


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def one_thread():
    """One intra-op thread while training in this process (as each torchrun worker has): two
    threads on a busy two-core machine are several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """`python -m torch.distributed.run --nproc_per_node=2 -m facegender train ...` on synthetic data."""
    root = tmp_path_factory.mktemp("ddp")
    # 21 images per class: a 7-image validation split, odd, so sharding it over 2 processes is uneven
    data = make_dataset(root / "data", n_train=21, n_test=10)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep Gloo's connections on the loopback interface
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(root / "out"),
        "--preset",
        "plain",
        "--backbone",
        SETTINGS["backbone"],
        "--no-pretrained",
        "--image-size",
        str(SETTINGS["image_size"]),
        "--epochs",
        str(SETTINGS["epochs"]),
        "--lr",
        str(SETTINGS["lr"]),
        "--batch-size",
        str(BATCH // 2),
        "--quiet",
    ]
    for _ in range(2):  # a second try if another program took the free port in the meantime
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "facegender",
            *args,
        ]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    return root, data, proc


def _ok(proc) -> None:
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_two_processes_write_one_set_of_outputs(ddp_run):
    root, _, proc = ddp_run
    _ok(proc)
    out = root / "out"
    for name in ("best_model.pth", "gender_checkpoint.pth", "summary.csv", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    rows = _read_rows(out / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # one row per epoch, none twice
    # only rank 0 prints: every epoch line and the final summary appear once
    for epoch in (1, 2, 3):
        assert proc.stdout.count(f"epoch {epoch:3d}  train loss") == 1, proc.stdout
    assert proc.stdout.count("Best epoch") == 1
    assert "2 processes x batch 8 = global batch 16" in proc.stdout
    state = ckpt.load_file(out / "gender_checkpoint.pth")
    assert state["world_size"] == 2 and state["epoch"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model_state"])  # plain model keys
    summary = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert summary["epochs_run"] == 3 and summary["test"]["n"] == 20


def test_two_processes_validation_metrics_are_exact(ddp_run):
    """The validation loss/accuracy of the best epoch, computed on two uneven shards and gathered,
    equal rank 0's single-process evaluation of best_model.pth on the whole validation split."""
    root, _, proc = ddp_run
    _ok(proc)
    summary = json.loads((root / "out" / "metrics.json").read_text(encoding="utf-8"))
    best = next(r for r in _read_rows(root / "out" / "summary.csv") if int(r["epoch"]) == summary["best_epoch"])
    assert summary["validation"]["n"] == 7
    assert float(best["val_acc"]) == pytest.approx(summary["validation"]["accuracy"], abs=1e-6)
    assert float(best["val_loss"]) == pytest.approx(summary["validation"]["loss"], rel=1e-4, abs=1e-5)


def test_two_processes_learn_like_one_process(ddp_run, tmp_path, one_thread):
    root, data, proc = ddp_run
    _ok(proc)
    from facegender.training.train import train

    cfg = build_config(None, data=str(data), out=str(tmp_path / "single"), batch_size=BATCH, **SETTINGS)
    single = train(cfg, log=lambda s: None, progress=False)
    two = json.loads((root / "out" / "metrics.json").read_text(encoding="utf-8"))
    # the synthetic classes are easy: both runs learn them (chance is 0.5); a 20-image test set
    # differs by a few images between runs, so "the same" means within 0.15
    assert single["test"]["accuracy"] >= 0.8
    assert two["test"]["accuracy"] >= 0.8
    assert abs(two["test"]["accuracy"] - single["test"]["accuracy"]) <= 0.15


def test_resume_two_process_checkpoint_with_one_process(ddp_run, tmp_path, one_thread):
    root, _, proc = ddp_run
    _ok(proc)
    from facegender.training.train import resume_config, train

    run = tmp_path / "run"
    shutil.copytree(root / "out", run)
    before = _read_rows(run / "summary.csv")
    cfg, state = resume_config(str(run / "gender_checkpoint.pth"), epochs=4)
    lines: list[str] = []
    train(cfg, state, log=lines.append, progress=False)
    assert any(s.startswith("Resuming") for s in lines)
    rows = _read_rows(run / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert rows[:3] == before  # the two-process epochs are kept as they were
    resumed = ckpt.load_file(run / "gender_checkpoint.pth")
    assert resumed["epoch"] == 4 and resumed["world_size"] == 1
    _, record = ckpt.load_model(run / "best_model.pth")  # still a plain, loadable model file
    assert record["classes"] == ["pria", "wanita"]


# ----------------------------------------------------------------------------- helpers, no process group


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [0, 1, 5, 7])
def test_shards_cover_every_item_once_and_interleave_back(world, n):
    items = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    shards = []
    for rank in range(world):
        idx = list(distributed.shard_sampler(n, distributed.DistContext(world_size=world, rank=rank)))
        shards.append(items[idx] if idx else torch.empty(0, 2))
    all_idx = sorted(
        i for r in range(world) for i in distributed.shard_sampler(n, distributed.DistContext(world_size=world, rank=r))
    )
    assert all_idx == list(range(n))  # no padding, no duplicates
    merged = distributed.interleave(shards, n)
    assert merged.shape[0] == n and (n == 0 or torch.equal(merged, items))


def test_interleave_rejects_a_wrong_shard():
    with pytest.raises(RuntimeError, match="rank 1"):
        distributed.interleave([torch.zeros(3), torch.zeros(1)], 5)


def test_single_process_context_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.device is None
    assert distributed.train_sampler([1, 2, 3], ctx, 0) is None
    assert distributed.shard_sampler(3, ctx) is None
    stats = {"loss": 1.0, "acc": 0.5, "n": 4, "seconds": 2.0, "images_per_sec": 2.0}
    assert distributed.reduce_train_stats(stats, ctx) is stats
    distributed.cleanup(ctx)
    assert not torch.distributed.is_initialized()


def test_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.setup("cpu")


def test_device_per_process():
    assert distributed.resolve_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        distributed.resolve_device("cuda:1", 0)
    if not torch.cuda.is_available():
        assert distributed.resolve_device("auto", 1) == torch.device("cpu")


def test_sync_bn_on_cpu_is_refused():
    model, _ = build_model("resnet18", 2, pretrained=False)
    ctx = distributed.DistContext(world_size=2, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        distributed.prepare_model(model, ctx, sync_bn=True)


def test_compiled_model_saves_plain_state_dict_keys():
    model, _ = build_model("resnet18", 2, pretrained=False)
    net = distributed.prepare_model(model, distributed.DistContext(), compile=True)  # compiles lazily
    assert net is not model and distributed.plain_module(net) is model
    cfg = build_config(None, data="x", backbone="resnet18", pretrained=False)
    from facegender.core.preprocessing import Preprocessing

    prep = Preprocessing(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    saved = ckpt.model_record(net, cfg.to_dict(), ["a", "b"], prep, "none")["model_state"]
    assert list(saved) == list(model.state_dict())


def test_schedule_is_realigned_to_a_new_number_of_steps_per_epoch():
    """A cosine schedule saved after 2 epochs of 10 steps (2 processes) continues at epoch 2 of a
    5-step epoch (1 process with the double share), not at step 20 of it."""
    from facegender.training.train import make_optimizer, make_scheduler

    cfg = build_config(None, data="x", scheduler="cosine", warmup_epochs=1, epochs=4, lr=0.1)
    param = torch.nn.Linear(2, 2)

    opt = make_optimizer(cfg, param)
    sched = make_scheduler(cfg, opt, steps_per_epoch=10)
    for _ in range(20):
        opt.step()
        sched.step()

    ref_opt = make_optimizer(cfg, param)
    ref = make_scheduler(cfg, ref_opt, steps_per_epoch=5)
    for _ in range(10):
        ref_opt.step()
        ref.step()

    opt2 = make_optimizer(cfg, param)
    opt2.load_state_dict(opt.state_dict())  # as resuming does: learning rates of step 20 of the old run
    resumed = distributed.schedule_at(lambda o: make_scheduler(cfg, o, steps_per_epoch=5), opt2, step=2 * 5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert resumed.get_last_lr() == pytest.approx(ref.get_last_lr())
    opt2.step()
    resumed.step()
    ref_opt.step()
    ref.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


def test_warmup_then_cosine_schedule_per_step():
    """Linear warm-up over the first epoch, then cosine decay to 0 at the end of the last one."""
    import math

    from facegender.training.train import make_optimizer, make_scheduler

    cfg = build_config(None, data="x", scheduler="cosine", warmup_epochs=1, epochs=3, lr=0.1)
    opt = make_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = make_scheduler(cfg, opt, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * (t + 1) / 4 for t in range(4)] + [0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expected, abs=1e-9)
