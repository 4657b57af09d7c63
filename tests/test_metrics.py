"""Metrics checked against small cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from facegender.core.decision import apply_temperature
from facegender.evaluation import metrics as M

# Five binary predictions, 5 bins with edges 0, .2, .4, .6, .8, 1.
#   sample  probs        label  conf  pred  correct  bin
#   1       [.90, .10]   0      .90   0     yes      (.8, 1]
#   2       [.85, .15]   1      .85   0     no       (.8, 1]
#   3       [.30, .70]   1      .70   1     yes      (.6, .8]
#   4       [.35, .65]   1      .65   1     yes      (.6, .8]
#   5       [.45, .55]   0      .55   1     no       (.4, .6]
PROBS = np.array([[0.90, 0.10], [0.85, 0.15], [0.30, 0.70], [0.35, 0.65], [0.45, 0.55]])
LABELS = np.array([0, 1, 1, 1, 0])


def test_ece_hand_computed():
    # bin (.8,1]: conf (.90+.85)/2 = .875, acc 1/2 = .5 -> |.5-.875| = .375, weight 2/5 -> .150
    # bin (.6,.8]: conf (.70+.65)/2 = .675, acc 2/2 = 1 -> .325,         weight 2/5 -> .130
    # bin (.4,.6]: conf .55,                acc 0/1 = 0 -> .55,          weight 1/5 -> .110
    # ECE = .150 + .130 + .110 = .390
    assert M.expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.39)


def test_ece_perfect_and_empty():
    # Every sample at confidence 1 and correct: |1 - 1| = 0.
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.expected_calibration_error(probs, [0, 1]) == pytest.approx(0.0)
    assert M.expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 0.0


def test_reliability_bins_hand_computed():
    bins = M.reliability_bins(PROBS, LABELS, n_bins=5)
    assert len(bins) == 5
    assert [b["count"] for b in bins] == [0, 0, 1, 2, 2]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None  # empty bin
    assert bins[2]["lower"] == pytest.approx(0.4) and bins[2]["upper"] == pytest.approx(0.6)
    assert bins[2]["confidence"] == pytest.approx(0.55) and bins[2]["accuracy"] == 0.0
    assert bins[3]["confidence"] == pytest.approx(0.675) and bins[3]["accuracy"] == 1.0
    assert bins[4]["confidence"] == pytest.approx(0.875) and bins[4]["accuracy"] == 0.5
    json.dumps(bins, allow_nan=False)


def test_reliability_bin_edges_are_right_closed():
    # Confidence exactly 0.8 belongs to (0.6, 0.8], not (0.8, 1].
    bins = M.reliability_bins(np.array([[0.8, 0.2]]), [0], n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 0, 1, 0]


def test_wilson_matches_closed_formula():
    # Wilson score interval: with p = k/n and z = Phi^-1(0.975) = 1.959964,
    #   centre = (p + z^2/(2n)) / (1 + z^2/n)
    #   half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4 n^2))
    # For 8/10: centre = (0.8 + 0.19208)/1.38415 = 0.71674, half = 0.22653 -> (0.4902, 0.9433).
    k, n, z = 8, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = M.wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-9)
    assert high == pytest.approx(centre + half, abs=1e-9)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert isinstance(low, float) and isinstance(high, float)


def test_wilson_edge_cases():
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = M.wilson_interval(0, 5)
    assert low == 0.0 and 0.0 < high < 1.0
    low, high = M.wilson_interval(5, 5)
    assert high == 1.0 and 0.0 < low < 1.0
    assert M.wilson_interval(8, 10, confidence=0.99)[0] < M.wilson_interval(8, 10)[0]
    with pytest.raises(ValueError):
        M.wilson_interval(3, 2)


def test_classification_summary():
    # labels 0 0 0 1 1 ; preds 0 0 1 1 0  -> correct 3/5 = .6
    # class 0: recall 2/3, precision 2/3 (preds==0 at 0,1,4; correct 0,1); class 1: recall 1/2,
    # precision 1/2. Confusion (rows true): [[2, 1], [1, 1]].
    s = M.classification_summary([0, 0, 0, 1, 1], [0, 0, 1, 1, 0], ["male", "female"])
    assert s["n"] == 5
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["confusion_matrix"] == [[2, 1], [1, 1]]
    assert s["per_class"]["male"]["recall"] == pytest.approx(2 / 3)
    assert s["per_class"]["male"]["precision"] == pytest.approx(2 / 3)
    assert s["per_class"]["female"]["recall"] == pytest.approx(0.5)
    assert s["per_class"]["female"]["support"] == 2
    # f1(male) = 2/3, f1(female) = 1/2 -> macro = 7/12; balanced accuracy = (2/3 + 1/2)/2 = 7/12
    assert s["macro_f1"] == pytest.approx(7 / 12)
    assert s["balanced_accuracy"] == pytest.approx(7 / 12)
    assert s["accuracy_ci"] == pytest.approx(list(M.wilson_interval(3, 5)))
    json.dumps(s, allow_nan=False)
    empty = M.classification_summary([], [], ["a", "b"])
    assert empty["n"] == 0 and empty["accuracy"] is None
    json.dumps(empty, allow_nan=False)


# Planted groups:
#   i  label pred  race  correct
#   0  0     0     A     yes
#   1  0     1     A     no
#   2  1     1     A     yes      A: 2/3 correct; recall class0 1/2, class1 1/1
#   3  1     0     B     no
#   4  0     0     B     yes
#   5  1     0     B     no       B: 1/3 correct; recall class0 1/1, class1 0/2
#   6  0     1     C     no       C: 0/1 correct (too few when min_count=3)
G_LABELS = [0, 0, 1, 1, 0, 1, 0]
G_PREDS = [0, 1, 1, 0, 0, 0, 1]
G_RACE = ["A", "A", "A", "B", "B", "B", "C"]


def test_per_group_metrics_planted():
    res = M.per_group_metrics(G_LABELS, G_PREDS, {"race": G_RACE}, ["male", "female"], min_count=3)
    col = res["race"]
    a, b, c = col["groups"]["A"], col["groups"]["B"], col["groups"]["C"]
    assert (a["n"], a["correct"], b["n"], b["correct"], c["n"], c["correct"]) == (3, 2, 3, 1, 1, 0)
    assert a["accuracy"] == pytest.approx(2 / 3) and b["accuracy"] == pytest.approx(1 / 3)
    assert a["accuracy_ci"] == pytest.approx(list(M.wilson_interval(2, 3)))
    assert a["recall"]["male"] == {"n": 2, "recall": 0.5, "ci": list(M.wilson_interval(1, 2))}
    assert a["recall"]["female"]["recall"] == 1.0 and a["recall"]["female"]["n"] == 1
    assert b["recall"]["female"]["recall"] == 0.0 and b["recall"]["female"]["n"] == 2
    assert c["recall"]["female"] == {"n": 0, "recall": None, "ci": None}
    # C (accuracy 0) is flagged, not hidden, and not picked as worst: worst is B among A and B.
    assert (a["too_few"], b["too_few"], c["too_few"]) == (False, False, True)
    assert col["worst_group"] == "B" and col["best_group"] == "A"
    assert col["accuracy_gap"] == pytest.approx(2 / 3 - 1 / 3)
    assert col["compared_all_groups"] is False and col["note"] is None
    # Worst per-class recall among A and B: B/female at 0/2.
    assert col["worst_class_recall"] == {"group": "B", "class": "female", "recall": 0.0, "n": 2}
    json.dumps(res, allow_nan=False)


def test_per_group_metrics_all_too_few_says_so():
    res = M.per_group_metrics(G_LABELS, G_PREDS, {"race": G_RACE}, ["male", "female"])
    col = res["race"]
    assert all(g["too_few"] for g in col["groups"].values())
    assert col["compared_all_groups"] is True and "30" in col["note"]
    # Over all groups: worst C (0.0), best A (2/3).
    assert col["worst_group"] == "C" and col["accuracy_gap"] == pytest.approx(2 / 3)


def test_per_group_metrics_missing_values_and_length_check():
    res = M.per_group_metrics([0, 1], [0, 1], {"age": [None, ""]}, ["m", "f"], min_count=1)
    assert list(res["age"]["groups"]) == ["unknown"]
    assert res["age"]["groups"]["unknown"]["n"] == 2
    with pytest.raises(ValueError, match="age"):
        M.per_group_metrics([0, 1], [0, 1], {"age": ["x"]}, ["m", "f"])


# Coverage example: confidences .90 .60 .80 .55, correct yes no yes no.
C_PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
C_LABELS = np.array([0, 1, 1, 0])


def test_selective_metrics_at_threshold():
    # Threshold .7 keeps .90 and .80 (both correct): coverage 2/4 = .5, accuracy 2/2 = 1.
    s = M.selective_metrics(C_PROBS, C_LABELS, 0.7)
    assert s == {"coverage": 0.5, "accuracy_on_covered": 1.0, "n_covered": 2, "n_uncertain": 2, "n": 4}
    # Threshold .95 keeps nothing: accuracy is None, not NaN.
    s = M.selective_metrics(C_PROBS, C_LABELS, 0.95)
    assert s["coverage"] == 0.0 and s["accuracy_on_covered"] is None and s["n_uncertain"] == 4
    # Threshold equal to a confidence keeps it (uncertain means strictly below).
    assert M.selective_metrics(C_PROBS, C_LABELS, 0.6)["n_covered"] == 3


def test_coverage_curve():
    curve = M.coverage_curve(C_PROBS, C_LABELS, thresholds=[0.7, 0.0, 0.95])
    assert [p["threshold"] for p in curve] == [0.0, 0.7, 0.95]
    # Threshold 0 keeps all 4, 2 correct -> accuracy .5.
    assert curve[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.5, "n_kept": 4}
    assert curve[1] == {"threshold": 0.7, "coverage": 0.5, "accuracy": 1.0, "n_kept": 2}
    assert curve[2]["accuracy"] is None and curve[2]["n_kept"] == 0
    default = M.coverage_curve(C_PROBS, C_LABELS)
    assert default[0]["threshold"] == 0.0 and default[-1]["threshold"] == 0.99
    json.dumps(default, allow_nan=False)


def test_apply_temperature_one_is_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    e = np.exp(logits)
    expected = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(apply_temperature(logits, 1.0), expected, rtol=1e-12)
    # Higher temperature flattens: top probability goes down.
    assert apply_temperature(logits, 3.0).max() < expected.max()
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_temperature_scaling_fixes_planted_overconfidence():
    # Labels are drawn from softmax(true_logits); the "model" reports 5 * true_logits, so it is
    # over-confident by a factor 5 and the NLL-optimal temperature is about 5.
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=1.5, size=(3000, 2))
    p_true = apply_temperature(true_logits, 1.0)
    labels = (rng.random(3000) < p_true[:, 1]).astype(int)
    model_logits = 5.0 * true_logits
    t = M.fit_temperature(model_logits, labels)
    assert isinstance(t, float) and t > 1.0
    assert t == pytest.approx(5.0, abs=1.0)
    before = M.nll(apply_temperature(model_logits, 1.0), labels)
    after = M.nll(apply_temperature(model_logits, t), labels)
    assert after < before
    assert M.expected_calibration_error(apply_temperature(model_logits, t), labels) < M.expected_calibration_error(
        apply_temperature(model_logits, 1.0), labels
    )


def test_fit_temperature_edge_cases():
    assert M.fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 1.0
    # No mistakes to calibrate against: the NLL would fall all the way to T -> 0; T stays 1.
    assert M.fit_temperature(np.array([[3.0, -3.0], [-3.0, 3.0]]), [0, 1]) == 1.0
    # One mistake among confident right answers: a finite T, bounded away from the search limits.
    t = M.fit_temperature(np.array([[3.0, -3.0], [-3.0, 3.0], [2.0, 0.0], [1.0, -1.0]]), [0, 1, 1, 0])
    assert 0.05 < t < 20 and t != 1.0


def test_nll_matches_hand_value():
    # -(ln .9 + ln .15 + ln .7 + ln .65 + ln .45) / 5
    expected = -(math.log(0.9) + math.log(0.15) + math.log(0.7) + math.log(0.65) + math.log(0.45)) / 5
    assert M.nll(PROBS, LABELS) == pytest.approx(expected)
    # A class absent from labels is still fine because labels=range(C) is passed.
    assert M.nll(np.array([[0.2, 0.8]]), [1]) == pytest.approx(-math.log(0.8))


# ------------------------------------------------------------------------- report plots


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plots_write_pngs(tmp_path):
    from facegender.evaluation import plots as P

    bins = M.reliability_bins(PROBS, LABELS, n_bins=5)
    p = P.plot_reliability(bins, tmp_path / "sub" / "reliability.png", "test")
    assert p == tmp_path / "sub" / "reliability.png" and p.stat().st_size > 0
    w, h = _png_size(p)
    assert w / h == pytest.approx(1.0, abs=0.02)  # 6 x 6 in

    groups = M.per_group_metrics(G_LABELS, G_PREDS, {"race": G_RACE}, ["m", "f"], min_count=3)
    p = P.plot_group_accuracy(groups["race"], tmp_path / "race.png", "race")
    w, h = _png_size(p)
    assert w / h == pytest.approx(6 / 4, abs=0.02)  # 3 groups -> minimum 6 x 4 in

    curve = M.coverage_curve(C_PROBS, C_LABELS)  # includes thresholds with nothing kept
    p = P.plot_coverage(curve, tmp_path / "coverage.png")
    w, h = _png_size(p)
    assert w / h == pytest.approx(6.4 / 4, abs=0.02)

    # Overwriting works and no temporary files are left behind.
    P.plot_coverage(curve, tmp_path / "coverage.png")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["coverage.png", "race.png", "sub"]
    assert [f.name for f in (tmp_path / "sub").iterdir()] == ["reliability.png"]
