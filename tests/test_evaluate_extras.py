"""evaluate beyond accuracy: per-group numbers against a hand count, both groups.csv path forms,
coverage at a confidence threshold, TTA reported beside the plain model, figures, and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from facegender.evaluation.evaluate import evaluate_model
from facegender.evaluation.metrics import wilson_interval
from facegender.evaluation.report import read_groups


def _quiet(**kw):
    return dict(log=lambda s: None, progress=False, **kw)


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """evaluate --groups (mixed path forms, one image left out) --min-confidence 0.9 --out."""
    tmp = tmp_path_factory.mktemp("evaluate")
    test_dir = trained_run / "data" / "test"
    files = sorted(test_dir.rglob("*.jpg"))
    groups = tmp / "groups.csv"
    bands = {}
    with open(groups, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "band"])
        for i, p in enumerate(files[:-1]):  # the last image has no row: group "unknown"
            rel = p.relative_to(test_dir.parent) if i % 2 else p.relative_to(test_dir)  # test/c/x.jpg or c/x.jpg
            bands[p.name] = "a" if i % 3 == 0 else "b"
            w.writerow([rel.as_posix(), p.parent.name, bands[p.name]])
    bands[files[-1].name] = "unknown"
    out = tmp / "out"
    metrics = evaluate_model(
        str(trained_run / "out" / "best_model.pth"),
        str(test_dir),
        str(out),
        **_quiet(groups=str(groups), min_confidence=0.9, min_group_size=5),
    )
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return metrics, rows, bands, out


def test_per_group_numbers_match_a_hand_count(evaluated):
    metrics, rows, bands, _ = evaluated
    col = metrics["groups"]["band"]
    assert set(col["groups"]) == {"a", "b", "unknown"}
    assert metrics["groups_matched"] == len(rows) - 1
    for band, g in col["groups"].items():
        mine = [r for r in rows if bands[Path(r["path"]).name] == band]
        correct = sum(r["true"] == r["predicted"] for r in mine)
        assert (g["n"], g["correct"]) == (len(mine), correct)
        assert g["accuracy"] == pytest.approx(correct / len(mine))
        assert g["accuracy_ci"] == pytest.approx(list(wilson_interval(correct, len(mine))))
        assert g["too_few"] == (len(mine) < 5)
        for cls in ("pria", "wanita"):
            of_cls = [r for r in mine if r["true"] == cls]
            hits = sum(r["predicted"] == cls for r in of_cls)
            assert g["recall"][cls]["n"] == len(of_cls)
            if of_cls:
                assert g["recall"][cls]["recall"] == pytest.approx(hits / len(of_cls))
    assert col["groups"]["unknown"]["too_few"]  # one image


def test_min_confidence_coverage_matches_a_hand_count(evaluated):
    metrics, rows, _, _ = evaluated
    s = metrics["selective"]
    kept = [r for r in rows if float(r["probability"]) >= 0.9]
    assert s["min_confidence"] == 0.9
    assert (s["n_covered"], s["n"]) == (len(kept), len(rows))
    assert s["coverage"] == pytest.approx(len(kept) / len(rows))
    if kept:
        assert s["accuracy_on_covered"] == pytest.approx(sum(r["true"] == r["predicted"] for r in kept) / len(kept))
    for point in metrics["coverage_curve"]:  # every threshold of the curve, including 0.9
        n = sum(float(r["probability"]) >= point["threshold"] - 5e-7 for r in rows)
        assert point["n_kept"] == n
    assert 0.9 in [p["threshold"] for p in metrics["coverage_curve"]]


def test_evaluate_writes_figures_and_json(evaluated):
    metrics, _, _, out = evaluated
    for name in ("confusion_matrix", "reliability", "reliability_calibrated", "coverage", "groups_band"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["groups"]["band"]["worst_group"] == metrics["groups"]["band"]["worst_group"]
    assert len(saved["reliability"]["before"]) == len(saved["reliability"]["after"]) == 15
    assert sum(b["count"] for b in saved["reliability"]["after"]) == saved["n"]


def test_tta_is_reported_beside_the_plain_model(trained_run):
    args = (str(trained_run / "out" / "best_model.pth"), str(trained_run / "data" / "test"))
    plain = evaluate_model(*args, tta=False, **_quiet())
    flipped = evaluate_model(*args, tta=True, **_quiet())
    assert "without_tta" not in plain and not plain["tta"]
    assert flipped["tta"]
    for key in ("accuracy", "loss", "ece", "ece_calibrated"):
        assert flipped["without_tta"][key] == pytest.approx(plain[key])
    assert flipped["loss"] != pytest.approx(plain["loss"], abs=1e-9)  # mirror images change the logits


def test_groups_file_errors_name_the_file_and_the_fix(tmp_path):
    paths = [tmp_path / "test" / "m" / "a.jpg"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,band\nm/a.jpg,x\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        read_groups(bad, paths, tmp_path / "test")
    only_label = tmp_path / "label.csv"
    only_label.write_text("path,label\nm/a.jpg,m\n")
    with pytest.raises(ValueError, match="no group columns"):
        read_groups(only_label, paths, tmp_path / "test")
    other = tmp_path / "other.csv"
    other.write_text("path,band\nelsewhere/z.jpg,x\n")
    with pytest.raises(ValueError, match="relative to"):
        read_groups(other, paths, tmp_path / "test")
    ok = tmp_path / "ok.csv"
    ok.write_text("path,band\n.\\test\\m\\a.jpg,x\n")  # Windows separators, relative to the dataset root
    assert read_groups(ok, paths, tmp_path / "test") == ({"band": ["x"]}, 1)


@pytest.mark.parametrize(
    "argv, expected",
    [([], None), (["--tta"], True), (["--tta", "flip"], True), (["--tta", "none"], False), (["--no-tta"], False)],
)
def test_cli_tta_forms(argv, expected):
    from facegender.app.cli import _tta, build_parser

    args = build_parser().parse_args(["evaluate", "--model", "m.pth", "--data", "d", *argv])
    assert _tta(args) is expected


def test_selective_numbers_on_spread_probabilities():
    import numpy as np

    from facegender.evaluation.report import Predictions, analyse

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p_top = np.array([0.55, 0.65, 0.75, 0.85, 0.95, 0.6, 0.9, 0.99])
    right = np.array([1, 0, 1, 1, 1, 0, 0, 1], dtype=bool)
    guess = np.where(right, labels, 1 - labels)
    probs = np.zeros((8, 2))
    probs[np.arange(8), guess] = p_top
    probs[np.arange(8), 1 - guess] = 1 - p_top
    m = analyse(Predictions(["a", "b"], [f"{i}.jpg" for i in range(8)], labels, np.log(probs)), min_confidence=0.8)
    kept = p_top >= 0.8  # 0.85, 0.95, 0.9, 0.99 -> right, right, wrong, right
    assert m["selective"]["n_covered"] == 4 and m["selective"]["coverage"] == pytest.approx(0.5)
    assert m["selective"]["accuracy_on_covered"] == pytest.approx(right[kept].mean()) == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(right.mean())
