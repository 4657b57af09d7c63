"""Classifier latency per face: PyTorch (eager, fp32, as `predict` runs it) vs onnxruntime, at batch 1 and 32.

    python benchmarks/onnx_latency.py [--backbone efficientnet_lite0] [--threads 1] [--data DATASET]

Builds a real-size model (ImageNet weights, random 2-class head: speed does not depend on the
head), saves it as best_model.pth the way `train` does, exports it with `facegender export`
(which checks parity), then times the network alone on the same normalised input batches. PyTorch
and onnxruntime runs alternate so that load from other processes hits both alike; the figure is
the median over repeats, in milliseconds per face. Face detection is not included (see
benchmarks/face_margin.py for its cost).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facegender.core.preprocessing import Preprocessing
from facegender.training import checkpoint as ckpt
from facegender.training.backbones import WeightsNotFoundError, build_model, get_spec
from facegender.training.config import TrainConfig
from facegender.training.export import export_model


def build_model_file(
    path: Path,
    backbone: str = "efficientnet_lite0",
    image_size: int = 224,
    align: bool = False,
    classes=("female", "male"),
) -> Path:
    """best_model.pth of `backbone` with ImageNet weights (random when they are not available
    offline) and a random head; with `align`, the model detects and aligns faces like --preset best."""
    torch.manual_seed(0)
    try:
        model, source = build_model(backbone, len(classes), pretrained=True)
        pretrained = True
    except WeightsNotFoundError:
        model, source = build_model(backbone, len(classes), pretrained=False)
        pretrained = False
    spec = get_spec(backbone)
    face = None
    if align:
        from facegender.core.faces.align import FaceAlignConfig

        face = FaceAlignConfig(size=image_size).to_dict()
    prep = Preprocessing(image_size, spec.mean, spec.std, face=face)
    cfg = TrainConfig(backbone=backbone, image_size=image_size, pretrained=pretrained, align=align).to_dict()
    record = ckpt.model_record(
        model,
        cfg,
        list(classes),
        prep,
        source,
        temperature=1.0,
        tta=False,
        metrics={"note": "benchmark model: ImageNet body, random head"},
    )
    return ckpt.save_atomic(record, path)


def median_ms(fn, batch, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for both runtimes (1: on a shared 2-core machine more threads wait on each other)",
    )
    parser.add_argument("--data", help="images for the export's parity check (default: synthetic)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating PyTorch/ONNX rounds")
    args = parser.parse_args()

    import facegender
    from facegender.core.onnx_model import load_onnx_classifier

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pth = build_model_file(Path(tmp) / "best_model.pth", args.backbone, args.image_size)
        report = export_model(
            facegender.load(pth, device="cpu", detect=False), Path(tmp) / "model.onnx", data=args.data
        )
        model, _ = ckpt.load_model(pth)
        onnx_fn, _ = load_onnx_classifier(report["out"], threads=args.threads)

        @torch.inference_mode()
        def torch_fn(batch: torch.Tensor) -> np.ndarray:
            return model(batch).numpy()

        gen = torch.Generator().manual_seed(0)
        rows = []
        for size, repeats in ((1, 20), (32, 2)):
            batch = torch.randn(size, 3, args.image_size, args.image_size, generator=gen)
            results = {"PyTorch": [], "onnxruntime": []}
            for _ in range(args.rounds):
                results["PyTorch"].append(median_ms(torch_fn, batch, repeats, warmup=1) / size)
                results["onnxruntime"].append(median_ms(onnx_fn, batch, repeats, warmup=1) / size)
            rows.append((size, statistics.median(results["PyTorch"]), statistics.median(results["onnxruntime"])))

    print(
        f"\n{args.backbone} at {args.image_size}px, {args.threads} thread(s), torch {torch.__version__}, "
        f"parity max |dp| = {report['parity_max_abs_diff']:.1e} ({report['parity_images']})"
    )
    print("| batch | PyTorch ms/face | onnxruntime ms/face | speed-up |")
    print("|---:|---:|---:|---:|")
    for size, pt, ox in rows:
        print(f"| {size} | {pt:.2f} | {ox:.2f} | {pt / ox:.2f}x |")


if __name__ == "__main__":
    main()
