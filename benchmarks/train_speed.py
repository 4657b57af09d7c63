"""Training throughput (images/second, data loading included) of facegender's training step against a
plain fp32 loop in the same run, for each backbone and precision.

    .venv/bin/python benchmarks/train_speed.py --data ../shared/datasets/faces-dev --images 192

The plain loop is what the course report's script does: PIL decode + resize + augmentation of every
image in every epoch, the whole network trained in fp32, default memory format. facegender's loop
reads each image once (cached uint8 tensors; the one-time read is printed separately), augments
tensors, uses channels_last, keeps the ImageNet stem fixed, and the precision chosen (auto = bf16
only on CPUs with bf16 units). Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from facegender.core.images import load_image
from facegender.core.preprocessing import ImagePreparer, Preprocessing
from facegender.data.dataset import ImageLoader, Split, load_split, scan_dataset
from facegender.training.backbones import build_model, freeze_stem, get_spec
from facegender.training.engine import FaceDataset, make_loader, select_precision, train_one_epoch
from facegender.training.transforms import TrainPreset


class PlainFolder(Dataset):
    """The report's data path: open, convert and augment with PIL on every access."""

    def __init__(self, split: Split, mean, std):
        self.split = split
        self.tf = T.Compose(
            [
                T.Resize((224, 224)),
                T.RandomHorizontalFlip(),
                T.RandomRotation(10),
                T.ColorJitter(brightness=0.2, contrast=0.2),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.tf(load_image(self.split.paths[i])), self.split.labels[i]


def plain_loop(backbone: str, split: Split) -> float:
    spec = get_spec(backbone)
    model, _ = build_model(backbone, 2, pretrained=False)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    loader = DataLoader(PlainFolder(split, spec.mean, spec.std), batch_size=32, shuffle=True)
    crit = nn.CrossEntropyLoss()
    n, start = 0, None
    for i, (x, y) in enumerate(loader):
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 0:  # the first batch warms up; time the rest, loading included
            start = time.perf_counter()
        else:
            n += len(y)
    return n / (time.perf_counter() - start)


def facegender_loop(backbone: str, loaded, precision: str, freeze: bool, channels_last: bool) -> float:
    spec = get_spec(backbone)
    prep = Preprocessing(224, spec.mean, spec.std)
    model, _ = build_model(backbone, 2, pretrained=False)
    if freeze:
        freeze_stem(model, backbone)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    loader = make_loader(FaceDataset(loaded, TrainPreset(prep, "report")), 32, shuffle=True)
    precision = select_precision(precision, torch.device("cpu"))
    # warm-up on one batch, then one timed epoch
    warm = next(iter(loader))
    train_one_epoch(
        model,
        [warm],
        nn.CrossEntropyLoss(),
        opt,
        torch.device("cpu"),
        precision,
        channels_last=channels_last,
        progress=False,
    )
    stats = train_one_epoch(
        model,
        loader,
        nn.CrossEntropyLoss(),
        opt,
        torch.device("cpu"),
        precision,
        channels_last=channels_last,
        progress=False,
    )
    return stats["images_per_sec"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/datasets/faces-dev"))
    ap.add_argument("--images", type=int, default=192, help="training images per timed epoch")
    ap.add_argument("--backbones", default="efficientnet_lite0,resnet18")
    ap.add_argument("--precisions", default="auto,fp32,bf16", help="bf16 is very slow on CPUs without bf16 units")
    args = ap.parse_args()
    torch.manual_seed(0)
    _, train, _ = scan_dataset(args.data, need_test=False)
    split = train.subset(list(range(0, len(train), max(1, len(train) // args.images)))[: args.images])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(split)} images from {args.data}")
    print(f"auto precision on this CPU: {select_precision('auto', torch.device('cpu'))}")
    rows = []
    for backbone in args.backbones.split(","):
        spec = get_spec(backbone)
        start = time.perf_counter()
        loaded = load_split(split, ImageLoader(ImagePreparer(Preprocessing(224, spec.mean, spec.std))), progress=False)
        read_s = time.perf_counter() - start
        base = plain_loop(backbone, split)
        rows.append((backbone, "plain loop (report script), fp32", base, 1.0))
        print(f"{backbone}: one-time read of {len(split)} images into the cache: {read_s:.1f} s", flush=True)
        for precision, (freeze, cl) in itertools.product(
            args.precisions.split(","), [(True, True), (False, True), (False, False)]
        ):
            if precision != "fp32" and not (freeze and cl):
                continue
            ips = facegender_loop(backbone, loaded, precision, freeze, cl)
            chosen = "=" + select_precision(precision, torch.device("cpu")) if precision == "auto" else ""
            label = (
                f"facegender, {precision}{chosen}{', channels_last' if cl else ''}{', stem fixed' if freeze else ''}"
            )
            rows.append((backbone, label, ips, ips / base))
            print(f"  {label}: {ips:.1f} img/s ({ips / base:.1f}x)", flush=True)
    print("\n| backbone | training loop | img/s | vs plain |\n|---|---|---|---|")
    for backbone, label, ips, ratio in rows:
        print(f"| {backbone} | {label} | {ips:.1f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
