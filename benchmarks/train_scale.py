"""Training at scale: images/s of each stage of the bundled recipe, peak memory, and the projected
wall time for a large training set.

    python benchmarks/train_scale.py --data ../shared/datasets/aaf-adult --images 1000 [--device cpu]

Stages, each measured on the first --images images of --data (a folder of class folders, or a
dataset with train/), with empty caches in a temporary folder so the work is real:
  align    read, detect (RetinaFace) and align every image (the aligned-face cache being written)
  prefix   the frozen first stages of dlib's ResNet on every view (--views, the recipe's 4)
  epoch    one fine-tuning epoch of the trainable last stages on the cached prefix
  full     one epoch of the same stages without the cached prefix (every view through the whole
           network, as `--no-cached-prefix` trains), for comparison
Then: peak RSS, and the projected time for --project images (default 100,000) with the recipe's
epochs: align + views x prefix + epochs x epoch, from these rates.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}/s ({seconds:6.1f} s for {n})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="the recipe's epochs, for the projection")
    parser.add_argument("--trainable-stages", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--project", type=int, default=100_000)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="train-scale-")
    os.environ["FACEGENDER_CACHE"] = scratch  # empty caches: aligned faces and prefix outputs
    import numpy as np
    import torch

    from facegender.core.preprocessing import ImagePreparer
    from facegender.data.dataset import ImageLoader, load_split
    from facegender.data.sources import read_sources, scan_sources
    from facegender.training.backbones import build_model, freeze_body, split_body
    from facegender.training.config import build_config
    from facegender.training.engine import make_loader, select_device, train_one_epoch
    from facegender.training.features import FeatureExtractor, feature_dataset
    from facegender.training.train import make_optimizer, preprocessing_for

    device = select_device(args.device)
    cfg = build_config("best", data=[args.data], frozen_features=False, trainable_stages=args.trainable_stages)
    split = scan_sources(read_sources(cfg.data), need_test=False).train
    split = split.subset(np.linspace(0, len(split) - 1, min(args.images, len(split))).astype(int).tolist())
    n = len(split)
    prep = preprocessing_for(cfg)

    t = time.perf_counter()
    loaded = load_split(split, ImageLoader(ImagePreparer(prep)), progress=False)
    align_s = time.perf_counter() - t
    print(f"align   {_rate(n, align_s)}")

    model, source = build_model(cfg.backbone, 2, cfg.dropout)
    freeze_body(model, cfg.trainable_stages, cfg.backbone)
    model.to(device)
    prefix, rest = split_body(model, cfg.trainable_stages, cfg.backbone)
    extractor = FeatureExtractor(
        prefix, prep, f"{source}; scale benchmark", device, augment=cfg.augment, dtype=np.float16
    )
    t = time.perf_counter()
    outputs = extractor.embed(loaded.images, args.views, progress=False)
    prefix_s = time.perf_counter() - t
    print(f"prefix  {_rate(n * args.views, prefix_s)}  views, {outputs[0].numel() * 2 // 1024} KiB an image")

    optimizer = make_optimizer(cfg, model)
    criterion = torch.nn.CrossEntropyLoss()
    loader = make_loader(feature_dataset(outputs, split.labels), cfg.batch_size, shuffle=True)
    t = time.perf_counter()
    train_one_epoch(rest, loader, criterion, optimizer, device, "fp32", progress=False)
    epoch_s = time.perf_counter() - t
    print(f"epoch   {_rate(n * args.views, epoch_s)}  views, cached prefix")

    from facegender.training.engine import FaceDataset
    from facegender.training.transforms import TrainPreset

    full = FaceDataset(loaded, TrainPreset(prep, cfg.augment))
    t = time.perf_counter()
    train_one_epoch(
        model, make_loader(full, cfg.batch_size, shuffle=True), criterion, optimizer, device, "fp32", progress=False
    )
    full_s = time.perf_counter() - t
    print(f"full    {_rate(n, full_s)}  images, whole network (no cached prefix)")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB ({n} images, {args.views} views)")
    scale = args.project / n
    projected = scale * (align_s + prefix_s + args.epochs * epoch_s)
    without = scale * (align_s + args.epochs * args.views * full_s)
    print(
        f"projected for {args.project:,} images on {device}: {projected / 3600:.2f} h with the cached prefix "
        f"(align {scale * align_s / 60:.0f} min, prefix {scale * prefix_s / 60:.0f} min, {args.epochs} epochs "
        f"{args.epochs * scale * epoch_s / 60:.0f} min); {without / 3600:.2f} h training the whole network on "
        f"the same {args.views} views an image"
    )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
