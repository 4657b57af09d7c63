"""What the bundled default model is, read from its record (`default_model/gender.json`).

The package ships one trained model (`default_model/gender.onnx`) and its record: file hash,
classes, preprocessing, the training data and recipe, and the measured accuracy that
docs/model-card.md reports. `facegender models` prints `describe_default_model()`. The file is
head-only (`contents: "head-only"`: the body is dlib's pretrained face descriptor, rebuilt from
the installed `face_recognition_models`) or whole-network (`contents: "whole-network"`, needing no
other package). It is rebuilt by `make default-model` (tools/build_default_model.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from facegender.core.resources import default_model_path, default_model_record

HEAD_ONLY = "head-only"
WHOLE_NETWORK = "whole-network"


def is_head_only(record: Mapping[str, Any]) -> bool:
    """Whether a bundled-model record describes a head-only file (records from before whole-network
    files say nothing: they are head-only)."""
    return record.get("contents", HEAD_ONLY) == HEAD_ONLY


def describe_default_model(record: Mapping[str, Any] | None = None) -> str:
    """What `facegender models` prints: of the bundled model's record, or of `record`."""
    r = default_model_record() if record is None else record
    m = r["measured"]
    ood = m["faces_ood"]
    recall = ", ".join(f"{c} {v:.3f}" for c, v in ood["recall"].items())
    t = r["training"]
    size = f"{r['bytes'] / 1e6:.1f} MB" if r["bytes"] >= 100_000 else f"{r['bytes'] / 1e3:.1f} KB"
    if is_head_only(r):
        file_line = f"head only ({size}); the body is built from the installed face_recognition_models package"
        body = "body frozen, from the installed face_recognition_models package"
    else:
        file_line = f"whole network ({size}, {r.get('quantization', 'fp32')} weights); needs no other package"
        body = r.get("body") or "body fine-tuned, stored in the file"
    lines = [
        f"bundled default model: {default_model_path()}",
        f"  file          {file_line}",
        f"  backbone      {r['backbone']} (pretrained on {r['pretrained_on']}; {body})",
        f"  classes       {', '.join(r['classes'])}",
        f"  training data {t['data']}: {t['images']} images, "
        f"{t['validation_fraction']:.0%} of them held out for validation",
    ]
    for source in t.get("sources") or []:
        licence = f"; licence: {source['licence']}" if source.get("licence") else ""
        lines.append(f"    {source['name']}: {source['images']} images{licence}")
    lines += [
        f"  recipe        {t['recipe']}",
        f"  faces-gdf/test accuracy {m['gdf_test']['accuracy']:.3f} (n={m['gdf_test']['n']})",
        f"  faces-ood (FairFace, other source) accuracy {ood['accuracy']:.3f} (n={ood['n']}); recall {recall}",
        f"  sample photos {m['samples']['right']}/{m['samples']['total']} faces right",
    ]
    if r.get("variants"):
        lines.append(f"  variants      {format_variants(r['variants'], r.get('quantization'))}")
    lines += [
        f"  sha256        {r['sha256']}",
        "  model card    docs/model-card.md (intended use, limits, per-group accuracy)",
        f"  rebuild with  {REBUILD_COMMAND}",
    ]
    return "\n".join(lines)


def _body(cfg: Mapping[str, Any]) -> str:
    """How the run treated the body, in words."""
    if cfg.get("frozen_features"):
        return "body frozen at its pretrained weights"
    stages = cfg.get("trainable_stages", -1)
    scale = f" at {cfg.get('body_lr_scale', 1.0):g}x the learning rate" if cfg.get("body_lr_scale", 1.0) != 1.0 else ""
    if stages is None or stages < 0:
        return f"whole body fine-tuned{scale}"
    return f"body's last {stages} stage{'s' if stages != 1 else ''} fine-tuned{scale}"


def _recipe(cfg: Mapping[str, Any]) -> str:
    recipe = f"facegender train --preset {cfg['preset']}" if cfg.get("preset") else "facegender train (config below)"
    return recipe if cfg.get("frozen_features") else f"{recipe}; {_body(cfg)}"


REBUILD_COMMAND = "make default-model"


def format_variants(variants: Mapping[str, Mapping[str, Any]], chosen: str | None = None) -> str:
    """One line comparing the exported variants (`build_default_model`'s `variants`)."""
    parts = []
    for name, v in variants.items():
        if v.get("error"):
            parts.append(f"{name} failed")
            continue
        mark = " (shipped)" if name == chosen else ""
        parts.append(
            f"{name}{mark} {v['bytes'] / 1e6:.1f} MB, faces-ood {v['faces_ood']:.3f}, "
            f"faces-gdf/test {v['gdf_test']:.3f}"
        )
    return "; ".join(parts)
