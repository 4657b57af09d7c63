"""Saving and loading PyTorch model files: plain-data checkpoints, and the one place a model file is read.

`best_model.pth` holds what prediction needs: weights, backbone, class names, preprocessing,
temperature, metrics. `gender_checkpoint.pth` adds what resuming needs: optimizer and scheduler
state, history, config, RNG and early-stopping state. Both contain only tensors, dicts, lists,
strings and numbers, so `torch.load(..., weights_only=True)` reads them.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facegender.core.files import CheckpointError, atomic_path
from facegender.core.preprocessing import Preprocessing
from facegender.training.backbones import FaceClassifier, WeightsNotFoundError, build_model, get_spec
from facegender.training.distributed import plain_module

FORMAT = "facegender/1"


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_file(path: str | os.PathLike) -> dict:
    """Read a facegender .pth file safely (weights_only=True); clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: model file not found; train one with `facegender train` or pass the path to best_model.pth"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # Python objects beyond plain data: never loaded (no weights_only=False)
        raise CheckpointError(
            f"{path}: not a facegender model file: it holds Python objects, not the plain data "
            "of a model file; pass best_model.pth from `facegender train`"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file, or not a PyTorch file at all
        raise CheckpointError(
            f"{path}: cannot be read as a facegender model (damaged, or not a model file: "
            f"{exc.__class__.__name__}); pass best_model.pth from `facegender train`"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a facegender model file (expected format {FORMAT})")
    return obj


def model_record(
    model: FaceClassifier, config: dict, classes: list[str], prep: Preprocessing, weights_source: str, **extra: Any
) -> dict:
    """Everything prediction needs, as plain data.

    A body that stayed fixed at pretrained weights from an installed package (`frozen_features`)
    is not stored: the record says `body_weights: "pretrained"` and loading takes the body from
    that package again (a few KB for a linear head instead of tens of MB)."""
    state = {k: v.detach().cpu() for k, v in plain_module(model).state_dict().items()}
    body_weights = "stored"
    if body_from_package(config):
        state = {k: v for k, v in state.items() if not k.startswith("body.")}
        body_weights = "pretrained"
    return {
        "format": FORMAT,
        "model_state": state,
        "body_weights": body_weights,
        "backbone": config["backbone"],
        "dropout": config["dropout"],
        "classes": list(classes),
        "preprocessing": prep.to_dict(),
        "pretrained": bool(config["pretrained"]),
        "weights_source": weights_source,
        "config": dict(config),
        **extra,
    }


def body_from_package(config: dict) -> bool:
    """True when the run kept the body at pretrained weights that an installed package provides,
    so model files need not store them."""
    spec = get_spec(config["backbone"])
    return (
        bool(config.get("frozen_features"))
        and bool(config.get("pretrained"))
        and not config.get("weights")
        and (spec.load_weights is not None or spec.packaged_file is not None)
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FaceClassifier, dict]:
    """(model in eval mode, record) from best_model.pth or gender_checkpoint.pth."""
    record = load_file(path)
    body_pretrained = record.get("body_weights") == "pretrained"
    try:
        model, _ = build_model(
            record["backbone"], len(record["classes"]), record.get("dropout", 0.0), pretrained=body_pretrained
        )
    except WeightsNotFoundError as exc:
        raise CheckpointError(
            f"{path}: this model uses the pretrained {record['backbone']} body, which could not be loaded: {exc}"
        ) from None
    try:
        missing, unexpected = model.load_state_dict(record["model_state"], strict=not body_pretrained)
        if body_pretrained and (unexpected or any(not k.startswith("body.") for k in missing)):
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {record['backbone']} ({exc})") from None
    model.to(device).eval()
    return model, record


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _tuples_to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x
