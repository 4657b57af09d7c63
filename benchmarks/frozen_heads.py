"""Which head on frozen face-recognition embeddings generalises best? (issue: face backbone)

    python benchmarks/frozen_heads.py [--shared ../shared] [--views 4]

Embeds faces-gdf/train (a stratified 15% validation split held out, as `facegender train` does),
faces-gdf/test and faces-ood with the dlib ResNet face descriptor on dlib chips made from the
RetinaFace landmarks (embeddings cached as in training, so a second run takes seconds), then fits
several heads on the training part and prints, per head: validation and faces-gdf/test accuracy,
faces-ood accuracy with female and male recall, and the worst age group / race on faces-ood.
faces-ood is never trained on; the heads are compared on validation first.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch


def load(shared: Path, views: int, visible: bool):
    from facegender.core import dlib_onnx
    from facegender.core.faces.align import FaceAlignConfig
    from facegender.core.preprocessing import ImagePreparer, Preprocessing
    from facegender.data.dataset import ImageLoader, Split, load_split, scan_dataset, split_train_val
    from facegender.training.backbones import build_model
    from facegender.training.features import FeatureExtractor
    from facegender.training.train import training_visible_region

    face = FaceAlignConfig(size=150, template="dlib", pad_color=(0, 0, 0)).to_dict()
    prep = Preprocessing(image_size=150, mean=dlib_onnx.DLIB_MEAN, std=dlib_onnx.DLIB_STD, face=face)
    loader = ImageLoader(ImagePreparer(prep))
    classes, train, test = scan_dataset(shared / "datasets/faces-gdf")
    train, val = split_train_val(train, 0.15, 42)
    ood_root = shared / "datasets/faces-ood"
    ood = Split()
    for label, name in enumerate(classes):
        files = sorted((ood_root / name).glob("*.jpg"))
        ood.paths += files
        ood.labels += [label] * len(files)
    splits = {}
    t0 = time.perf_counter()
    for name, split in (("train", train), ("val", val), ("test", test), ("ood", ood)):
        splits[name] = load_split(split, loader, desc=f"aligning {name}")
    print(f"aligned in {time.perf_counter() - t0:.0f} s")
    if visible:
        import dataclasses

        prep = dataclasses.replace(prep, visible=training_visible_region(splits["train"], loader, prep))
        print("visible region", prep.visible)
    model, source = build_model("dlib_resnet", 2)
    # the 256-d pooled features before dlib's last layer: the 128-d descriptor is fc(pooled), so one
    # pass gives both (`descriptor` below)
    body = model.body
    pooled = type("Pooled", (torch.nn.Module,), {"forward": lambda self, x: body.features(x)})()
    extractor = FeatureExtractor(pooled, prep, source + " pooled", torch.device("cpu"))
    t0 = time.perf_counter()
    emb = {
        name: extractor.embed(s.images, views if name == "train" else 2, f"embedding {name}")
        for name, s in splits.items()
    }
    print(f"embedded in {time.perf_counter() - t0:.0f} s")
    labels = {name: np.array(s.split.labels) for name, s in splits.items()}
    groups = {}
    with open(ood_root / "manifest.csv", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    for col in ("age_group", "race"):
        groups[col] = [rows[p.name][col] for p in splits["ood"].split.paths]
    return classes, emb, labels, groups, body.fc.weight.detach()


def report(name: str, classes, probs: dict, labels: dict, groups: dict) -> None:
    out = [f"{name:<34}"]
    for split in ("val", "test", "ood"):
        out.append(f"{split} {np.mean(probs[split].argmax(1) == labels[split]):.3f}")
    pred, y = probs["ood"].argmax(1), labels["ood"]
    rec = [np.mean(pred[y == c] == c) for c in range(len(classes))]
    out.append(" ".join(f"{c[:1]}-rec {r:.3f}" for c, r in zip(classes, rec)))
    worst = []
    for values in groups.values():
        values = np.array(values)
        accs = {g: np.mean(pred[values == g] == y[values == g]) for g in sorted(set(values))}
        g = min(accs, key=accs.get)
        worst.append(f"{g} {accs[g]:.3f}")
    out.append("worst " + ", ".join(worst))
    print("  ".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1] / ".." / "shared"))
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--no-visible", action="store_true", help="do not grey out the unfilled part of the chip")
    args = parser.parse_args()
    torch.set_num_threads(2)
    classes, pooled, labels, groups, fc = load(Path(args.shared), args.views, not args.no_visible)
    descriptor = {k: v @ fc.T for k, v in pooled.items()}
    for feats, emb in (("descriptor", descriptor), ("pooled", pooled)):
        print(f"--- {feats} ({emb['train'].shape[-1]}-d)")
        fit_heads(classes, emb, labels, groups, args.views)


def fit_heads(classes, emb, labels, groups, max_views: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    def eval_sets(fn):
        # test-time flip: mean of the probabilities of view 0 and view 1 (mirrored)
        return {s: (fn(emb[s][:, 0].numpy()) + fn(emb[s][:, 1].numpy())) / 2 for s in ("val", "test", "ood")}

    ytr = labels["train"]
    for views in sorted({1, max_views}):
        x = emb["train"][:, :views].reshape(-1, emb["train"].shape[-1]).numpy()
        y = np.repeat(ytr, views)
        for c in (0.1, 1.0, 10.0):
            for norm in (False, True):
                prep = (lambda a: normalize(a)) if norm else (lambda a: a)
                clf = LogisticRegression(C=c, max_iter=5000).fit(prep(x), y)
                report(
                    f"logreg C={c:g} views={views}{' l2' if norm else ''}",
                    classes,
                    eval_sets(lambda a, clf=clf, prep=prep: clf.predict_proba(prep(a))),
                    labels,
                    groups,
                )


if __name__ == "__main__":
    main()
