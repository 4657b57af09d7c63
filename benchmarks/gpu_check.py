"""GPU check, about 3-5 minutes on one GPU. NOT RUN YET: no GPU was available when it was written.

    python benchmarks/gpu_check.py --data ../shared/datasets/faces-gdf

1. Model throughput, images/second: facegender's training step (forward, backward, Adam step,
   stem frozen, channels_last, `engine.train_one_epoch`) and inference (`engine.predict_logits`)
   on synthetic batches already on the GPU, for each backbone at batch 32 and 128, fp32 against
   AMP (bf16 where the GPU supports it, else fp16 with a GradScaler). Weights are random: speed
   does not depend on them, and the GPU machine is offline. Data loading is not in these figures.
2. Time to early stop on faces-gdf: the real command, `python -m facegender train --data DATA
   --out TMP --quiet` with the default recipe (efficientnet_lite0 with its packaged ImageNet
   weights, so it works offline) and any `--train-args`; wall time, epochs, best epoch, test
   accuracy and training images/second per epoch (data loading included), read from the run's
   metrics.json and summary.csv. Stopped after --train-timeout seconds (the epochs finished by
   then are still reported).

On a machine without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_throughput(
    backbone: str, batch: int, precision: str, steps: int, warmup: int, image_size: int, device
) -> tuple[float, float]:
    """(training images/s, inference images/s) of `backbone` on synthetic batches on `device`."""
    import torch
    from torch import nn

    from facegender.training.backbones import build_model, freeze_stem
    from facegender.training.engine import predict_logits, train_one_epoch

    torch.manual_seed(0)
    model, _ = build_model(backbone, 2, 0.2, pretrained=False)
    freeze_stem(model, backbone)
    model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    crit = nn.CrossEntropyLoss()
    kw = dict(precision=precision, scaler=scaler, channels_last=True, progress=False)
    train_one_epoch(model, [(x, y)] * warmup, crit, opt, device, **kw)
    torch.cuda.synchronize(device)
    stats = train_one_epoch(model, [(x, y)] * steps, crit, opt, device, **kw)
    torch.cuda.synchronize(device)
    train_ips = stats["images_per_sec"]

    predict_logits(model, [(x, y)] * warmup, device, precision, True, progress=False)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    predict_logits(model, [(x, y)] * steps, device, precision, True, progress=False)  # logits copied to CPU
    torch.cuda.synchronize(device)
    infer_ips = batch * steps / (time.perf_counter() - start)
    del model, opt, x, y
    torch.cuda.empty_cache()
    return train_ips, infer_ips


def part_throughput(args, device) -> list[tuple]:
    import torch

    from facegender.training.engine import select_precision

    amp = select_precision("auto", device)
    rows = []
    for backbone in args.backbones.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for precision in ("fp32", amp):
                try:
                    tr, inf = model_throughput(
                        backbone, batch, precision, args.steps, args.warmup, args.image_size, device
                    )
                    rows.append((backbone, batch, precision, f"{tr:.0f}", f"{inf:.0f}"))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append((backbone, batch, precision, "out of memory", "-"))
                print(
                    f"  {backbone} batch {batch} {precision}: train {rows[-1][3]} img/s, inference {rows[-1][4]} img/s",
                    flush=True,
                )
    return rows


def part_train(args) -> dict:
    """Run `facegender train` to early stop (or the timeout) and read what it wrote."""
    data = Path(args.data)
    if not (data / "train").is_dir():
        return {"error": f"{data}/train not found; pass --data (the shared folder is ../shared/datasets/faces-gdf)"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "facegender",
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
            *shlex.split(args.train_args),
        ]
        print(f"  $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        start = time.perf_counter()
        timed_out, tail = False, ""
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.train_timeout)
            tail = (proc.stdout + proc.stderr)[-3000:]
            if proc.returncode != 0:
                return {"error": f"exit status {proc.returncode}", "tail": tail}
        except subprocess.TimeoutExpired:
            timed_out = True
        wall = time.perf_counter() - start
        rows = []
        if (out / "summary.csv").is_file():
            with open(out / "summary.csv", newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        result = {
            "wall_s": round(wall, 1),
            "timed_out": timed_out,
            "epochs_done": len(rows),
            "train_img_s_per_epoch": [float(r["images_per_sec"]) for r in rows],
            "epoch_seconds": [float(r["seconds"]) for r in rows],
            "command": " ".join(cmd),
        }
        if (out / "metrics.json").is_file():
            m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            result.update(
                best_epoch=m["best_epoch"],
                epochs_run=m["epochs_run"],
                stopped_early=m["stopped_early"],
                train_seconds=m["train_seconds"],
                test_accuracy=(m.get("test") or {}).get("accuracy"),
            )
        if not rows and tail:
            result["tail"] = tail
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "faces-gdf"))
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet18")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput figure")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotune, allocator)")
    parser.add_argument("--train-args", default="", help='extra flags for the faces-gdf run, e.g. "--compile"')
    parser.add_argument("--train-timeout", type=float, default=180, help="seconds before the faces-gdf run is stopped")
    parser.add_argument("--skip-train", action="store_true", help="only the throughput part")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to "
            "measure. Run it on a GPU machine: python benchmarks/gpu_check.py --data ../shared/datasets/faces-gdf"
        )
        return 0
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(device)
    print(
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    )
    began = time.perf_counter()

    print("\n1. model throughput (synthetic batches on the GPU, random weights)", flush=True)
    rows = part_throughput(args, device)
    print("\n| backbone | batch | precision | train img/s | inference img/s |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")

    if not args.skip_train:
        print(f"\n2. faces-gdf to early stop (timeout {args.train_timeout:.0f} s)", flush=True)
        result = part_train(args)
        if "error" in result:
            print(f"  failed: {result['error']}\n{result.get('tail', '')}")
        else:
            ips = result["train_img_s_per_epoch"]
            print(
                f"  wall {result['wall_s']} s (start-up, reading images and the final evaluation included)"
                f"{'; STOPPED BY THE TIMEOUT' if result['timed_out'] else ''}"
            )
            print(
                f"  epochs {result['epochs_done']}, best epoch {result.get('best_epoch')}, stopped early "
                f"{result.get('stopped_early')}, train seconds {result.get('train_seconds')}, "
                f"test accuracy {result.get('test_accuracy')}"
            )
            if ips:
                print(
                    f"  training img/s per epoch (data loading included): first {ips[0]:.0f}, "
                    f"median {sorted(ips)[len(ips) // 2]:.0f}; epoch seconds median "
                    f"{sorted(result['epoch_seconds'])[len(ips) // 2]:.1f}"
                )
            if result.get("tail"):
                print(result["tail"])
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
