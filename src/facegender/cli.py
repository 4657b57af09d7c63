"""The `facegender` command: a thin shell over the package's functions (nothing imports this module).

Each subcommand has an `_add_<name>` (its arguments) and a `_run_<name>` (calls the library).
Exit status: 0 success, 1 a problem with the input (a clear message, no traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

BOOL = argparse.BooleanOptionalAction

EXAMPLES = """examples:
  facegender train --data DATASET --out output/
  facegender train --data DATASET --preset report        # the course report's ResNet18 recipe
  facegender train --resume output/gender_checkpoint.pth
  facegender evaluate --model output/best_model.pth --data DATASET/test
  facegender predict --model output/best_model.pth photo1.jpg photo2.png --json
"""


# ----------------------------------------------------------------------------- train

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a classifier on DATASET/train, evaluate on DATASET/test",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Fine-tune an ImageNet backbone. DATASET/train/<class>/ and DATASET/test/<class>/ "
                                   "hold the images; class names are the folder names. The best epoch is chosen on a "
                                   "stratified validation split of train/ and test/ is used once, at the end.")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset folder with train/ and test/")
    g.add_argument("--out", help="run folder for models, curves and metrics (default: output)")
    g.add_argument("--resume", metavar="CHECKPOINT", help="continue an interrupted run from its gender_checkpoint.pth")
    g.add_argument("--preset", choices=["report", "best"], help="named recipe; explicit flags override it")
    g.add_argument("--val-fraction", type=float, help="share of train/ held out for validation (default 0.15)")
    g.add_argument("--val-on-test", action=BOOL, default=None,
                   help="choose the best epoch on test/ like the course report (optimistic; warns)")
    g.add_argument("--skip-bad", action=BOOL, default=None, help="leave unreadable images out instead of stopping")
    g.add_argument("--cache", action=BOOL, default=None, help="keep decoded images in memory (default on)")
    g.add_argument("--align", action=BOOL, default=None, help="detect and align faces before training")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="efficientnet_lite0 (default, offline weights), resnet18, resnet50, "
                                      "mobilenet_v3_large, efficientnet_b0")
    g.add_argument("--weights", metavar="FILE", help="ImageNet weight file for the backbone")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="train from random weights (recorded in the model file)")
    g.add_argument("--image-size", type=int, help="input size in pixels (default 224)")
    g.add_argument("--dropout", type=float, help="dropout before the final layer (default 0.2)")
    g.add_argument("--freeze-stem", action=BOOL, default=None,
                   help="keep the backbone's first layers fixed (faster; default on)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="maximum epochs (default 30)")
    g.add_argument("--batch-size", type=int, help="default 32")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--optimizer", choices=["adam", "adamw"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--scheduler", choices=["none", "cosine"])
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--augment", choices=["report", "strong", "none"], help="augmentation recipe (default report)")
    g.add_argument("--patience", type=int, help="early stopping: epochs without improvement (default 3)")
    g.add_argument("--monitor", choices=["val_acc", "val_loss"], help="what early stopping watches")
    g.add_argument("--tta", action=BOOL, default=None, help="flip test-time augmentation in evaluation")
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int, help="default 42")
    g.add_argument("--device", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16/fp16 where the hardware is fast at it, else fp32")
    g.add_argument("--channels-last", action=BOOL, default=None, help="channels-last memory format (default on)")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_TRAIN_KEYS = ["data", "out", "val_fraction", "val_on_test", "skip_bad", "cache", "align", "backbone", "weights",
               "pretrained", "image_size", "dropout", "freeze_stem", "epochs", "batch_size", "lr", "optimizer",
               "weight_decay", "scheduler", "warmup_epochs", "label_smoothing", "augment", "patience", "monitor",
               "tta", "seed", "device", "precision", "channels_last", "workers"]


def _run_train(args) -> int:
    from facegender.config import build_config
    from facegender.train import TrainingInterrupted, resume_config, train

    try:
        if args.resume:
            cfg, state = resume_config(args.resume, epochs=args.epochs, data=args.data, device=args.device,
                                       workers=args.workers)
        else:
            if not args.data:
                raise ValueError("--data DATASET is required (or --resume CHECKPOINT)")
            cfg = build_config(args.preset, **{k: getattr(args, k) for k in _TRAIN_KEYS})
            state = None
        train(cfg, state, progress=not args.quiet)
    except TrainingInterrupted:
        return 130
    return 0


# ----------------------------------------------------------------------------- evaluate

def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix on labelled images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="best_model.pth from train")
    p.add_argument("--data", required=True, help="folder with one subfolder per class, e.g. DATASET/test")
    p.add_argument("--out", help="write metrics.json and confusion_matrix.png here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action=BOOL, default=None, help="flip test-time augmentation (default: as trained)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_evaluate(args) -> int:
    from facegender.evaluate import evaluate_model

    metrics = evaluate_model(args.model, args.data, args.out, args.batch_size, args.device, args.tta,
                             args.skip_bad, log=(lambda s: None) if args.json else print, progress=not args.quiet)
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------- predict

def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label every face in images or folders",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="best_model.pth (or an exported .onnx)")
    p.add_argument("images", nargs="+", help="image files or folders (walked recursively)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--csv", action="store_true", help="CSV output, one row per face")
    p.add_argument("--no-detect", dest="detect", action="store_false", default=None,
                   help="treat each image as one already-cropped face")
    p.add_argument("--min-confidence", type=float, help="below this probability the label is 'uncertain'")
    p.add_argument("--tta", action=BOOL, default=None, help="flip test-time augmentation (default: as trained)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)


def _run_predict(args) -> int:
    from facegender.predict import Predictor, format_result

    kwargs = {"detect": args.detect, "min_confidence": args.min_confidence, "batch_size": args.batch_size}
    if args.tta is not None:
        kwargs["tta"] = args.tta
    predictor = Predictor.from_file(args.model, device=args.device, **kwargs)
    results = predictor.predict_paths(args.images)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    elif args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "face", "label", "probability", "x1", "y1", "x2", "y2", "status"])
        for r in results:
            for i, f in enumerate(r["faces"]):
                writer.writerow([r["file"], i + 1, f["label"], f["probability"], *f["box"], r["status"]])
            if not r["faces"]:
                writer.writerow([r["file"], "", "", "", "", "", "", "", r.get("error") or r["status"]])
    else:
        for r in results:
            print(format_result(r))
    failed = [r for r in results if r.get("error")]
    if failed:
        print(f"{len(failed)} of {len(results)} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- entry point

COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facegender", description="Train, evaluate and serve face gender "
                                     "classifiers by transfer learning.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from facegender import __version__

    parser.add_argument("--version", action="version", version=f"facegender {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from facegender.checkpoint import CheckpointError
    from facegender.images import ImageError
    from facegender.model import WeightsNotFoundError

    try:
        return COMMANDS[args.command][1](args)
    except (CheckpointError, ImageError, WeightsNotFoundError, ValueError, FileNotFoundError) as exc:
        print(f"facegender {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
