"""Evaluation metrics: accuracy, calibration, per-group breakdowns and selective prediction.

Pure functions: numpy arrays in, plain Python values out (floats, ints, lists, dicts, ``None``),
so every result can be written with ``json.dumps(..., allow_nan=False)``. The arithmetic is
delegated to scikit-learn (accuracy, recall, confusion matrix, log loss) and SciPy (Wilson
intervals, the temperature search); only the binning for calibration is done here. Both are
imported by the functions that use them, so that prediction, which needs only
``apply_temperature`` and ``Predictions``, starts without them (about 2 s of imports on a 2-core
CPU).

Conventions used throughout:

* ``probs`` is an ``(N, C)`` array of class probabilities (rows sum to 1), ``logits`` an
  ``(N, C)`` array of raw scores, ``labels`` and ``preds`` ``(N,)`` arrays of class indices
  ``0..C-1`` and ``class_names`` the ``C`` names in index order.
* The prediction is ``decide(probs, threshold)``: the arg-max class, or for two classes with a
  stored decision threshold, class 1 when ``probs[:, 1] >= threshold``
  (``equal_recall_threshold`` chooses one on validation). Functions that judge predictions take
  them as ``preds`` (default: the arg-max); the "confidence" is the probability of the predicted
  class. Loss and calibration always read the probabilities themselves.
* A value that cannot be computed (accuracy of an empty set, recall of a class with no
  samples) is ``None``, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "expected_calibration_error",
    "reliability_bins",
    "fit_temperature",
    "nll",
    "wilson_interval",
    "classification_summary",
    "per_group_metrics",
    "coverage_curve",
    "selective_metrics",
    "equal_recall_threshold",
]


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _as_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be an (N, C) array, got shape {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must be an (N,) array matching probs {probs.shape}, got shape {labels.shape}")
    return probs, labels.astype(np.int64, copy=False)


def _as_label_arrays(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    preds = np.asarray(preds).astype(np.int64, copy=False).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in length")
    return labels, preds


def _float_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin number of each confidence for equal-width bins (0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1].

    A confidence of exactly 0 (impossible for a top-label probability) goes into the first bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": a value equal to an upper edge belongs to the bin that edge closes.
    idx = np.searchsorted(edges, confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability_bins(probs, labels, n_bins: int = 15) -> list[dict[str, Any]]:
    """Per-bin statistics for a reliability diagram (top-label, equal-width bins over (0, 1]).

    Returns ``n_bins`` dicts, in order, each with ``lower``, ``upper`` (bin edges), ``count``
    (samples whose confidence falls in the bin), ``confidence`` (their mean top probability) and
    ``accuracy`` (fraction of them predicted correctly); the last two are ``None`` for an empty
    bin.
    """
    probs, labels = _as_probs_labels(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if probs.shape[0] == 0:
        conf = np.zeros(0)
        correct = np.zeros(0)
    else:
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = _bin_index(conf, n_bins)
    out = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        out.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "confidence": float(conf[mask].mean()) if count else None,
                "accuracy": float(correct[mask].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Naeini et al. 2015; Guo et al. 2017).

    ``ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`` over equal-width confidence bins
    (0, 1/n_bins], ..., with empty bins contributing nothing. Returns 0.0 for an empty input.
    """
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    ece = sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    return float(ece)


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the true labels (scikit-learn ``log_loss``)."""
    from sklearn import metrics as skm

    probs, labels = _as_probs_labels(probs, labels)
    if probs.shape[0] == 0:
        raise ValueError("nll needs at least one sample")
    return float(skm.log_loss(labels, probs, labels=list(range(probs.shape[1]))))


def fit_temperature(logits, labels, min_temperature: float = 0.01, max_temperature: float = 100.0) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising NLL of ``softmax(logits/T)``.

    The search is over ``log T`` in ``[log min_temperature, log max_temperature]`` with SciPy's
    bounded scalar minimiser (the NLL is smooth in log T). Fit on held-out data (validation split),
    not on training data. Returns 1.0 when there are no samples, and when every sample is already
    classified correctly: the NLL then keeps falling as T -> 0, so the fit would only say "be
    certain" (on a faces-dev fold with 120/120 right it gave T = 0.01, the bound, and test ECE rose
    from 0.043 to 0.055).
    """
    from scipy import optimize, special

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    n = logits.shape[0]
    if n == 0 or bool((logits.argmax(axis=1) == labels).all()):
        return 1.0
    rows = np.arange(n)

    def objective(log_t: float) -> float:
        logp = special.log_softmax(logits / math.exp(log_t), axis=1)
        return float(-logp[rows, labels].mean())

    res = optimize.minimize_scalar(
        objective,
        bounds=(math.log(min_temperature), math.log(max_temperature)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(math.exp(res.x))
    # Never return something worse than leaving the model alone.
    return t if objective(res.x) <= objective(0.0) else 1.0


# --------------------------------------------------------------------------------------------
# accuracy with intervals
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (SciPy ``binomtest(...).proportion_ci``).

    Returns ``(low, high)``; ``(0.0, 1.0)`` when ``n == 0`` (nothing is known).
    """
    from scipy import stats

    successes, n = int(successes), int(n)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(max(0.0, ci.low)), float(min(1.0, ci.high)))


def classification_summary(labels, preds, class_names: Sequence[str]) -> dict[str, Any]:
    """Overall metrics for a classifier.

    Returns a dict with ``n``, ``accuracy`` (None if n == 0) and its Wilson 95% ``accuracy_ci``,
    ``balanced_accuracy`` (mean per-class recall), ``macro_f1``, ``per_class`` (name ->
    ``precision``, ``recall``, ``f1``, ``support``; 0.0 where undefined, as scikit-learn's
    ``zero_division=0``), ``confusion_matrix`` (nested list, rows = true class, columns =
    predicted class, in ``class_names`` order) and ``class_names``.
    """
    from sklearn import metrics as skm

    labels, preds = _as_label_arrays(labels, preds)
    names = [str(c) for c in class_names]
    idx = list(range(len(names)))
    n = int(labels.shape[0])
    if n == 0:
        return {
            "n": 0,
            "accuracy": None,
            "accuracy_ci": [0.0, 1.0],
            "balanced_accuracy": None,
            "macro_f1": None,
            "per_class": {c: {"precision": None, "recall": None, "f1": None, "support": 0} for c in names},
            "confusion_matrix": [[0] * len(names) for _ in names],
            "class_names": names,
        }
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    correct = int((labels == preds).sum())
    present = support > 0
    return {
        "n": n,
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "accuracy_ci": list(wilson_interval(correct, n)),
        # Mean recall over the classes that occur (sklearn's balanced_accuracy_score ignores
        # labels absent from y_true the same way).
        "balanced_accuracy": float(recall[present].mean()) if present.any() else None,
        "macro_f1": float(skm.f1_score(labels, preds, labels=idx, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=idx).tolist(),
        "class_names": names,
    }


def _group_key(value) -> str:
    """A group value as a string key; missing values (None, NaN, empty) become ``"unknown"``."""
    if value is None:
        return "unknown"
    if isinstance(value, float) and math.isnan(value):
        return "unknown"
    s = str(value).strip()
    return s if s else "unknown"


def _one_group(labels: np.ndarray, preds: np.ndarray, names: list[str], min_count: int) -> dict:
    from sklearn import metrics as skm

    n = int(labels.shape[0])
    correct = int((labels == preds).sum())
    recall: dict[str, dict] = {}
    idx = list(range(len(names)))
    per_class_recall = skm.recall_score(labels, preds, labels=idx, average=None, zero_division=0)
    for i, name in enumerate(names):
        mask = labels == i
        n_i = int(mask.sum())
        hits = int((preds[mask] == i).sum())
        recall[name] = {
            "n": n_i,
            "recall": float(per_class_recall[i]) if n_i else None,
            "ci": list(wilson_interval(hits, n_i)) if n_i else None,
        }
    return {
        "n": n,
        "correct": correct,
        "accuracy": float(skm.accuracy_score(labels, preds)) if n else None,
        "accuracy_ci": list(wilson_interval(correct, n)),
        "recall": recall,
        "too_few": n < min_count,
    }


def per_group_metrics(
    labels, preds, groups: Mapping[str, Sequence[Any]], class_names: Sequence[str], min_count: int = 30
) -> dict[str, dict[str, Any]]:
    """Accuracy and per-class recall broken down by group (e.g. age band, skin tone, source).

    ``groups`` maps a column name to one value per sample (missing values -> ``"unknown"``).
    Returns ``{column: {...}}`` where each column's dict has:

    * ``groups``: ``{value: {n, correct, accuracy, accuracy_ci: [lo, hi], too_few,
      recall: {class: {n, recall, ci}}}}`` (Wilson 95% intervals; ``recall``/``ci`` are None for a
      class with no samples in the group). Groups with fewer than ``min_count`` samples are kept
      and flagged ``too_few=True``, never hidden.
    * ``worst_group`` / ``worst_accuracy``: lowest accuracy among groups with at least
      ``min_count`` samples; if no group has that many, among all groups, and
      ``compared_all_groups`` is True with a ``note`` saying so.
    * ``best_group``, ``accuracy_gap`` (best minus worst accuracy over the same groups).
    * ``worst_class_recall``: ``{group, class, recall, n}`` for the lowest per-class recall over
      the same groups (classes with no samples in a group are ignored), or None.
    """
    labels, preds = _as_label_arrays(labels, preds)
    names = [str(c) for c in class_names]
    result: dict[str, dict[str, Any]] = {}
    for column, values in groups.items():
        per_group = _groups_of_column(column, values, labels, preds, names, min_count)
        result[str(column)] = _compare_groups(per_group, min_count)
    return result


def _groups_of_column(
    column, values: Sequence[Any], labels: np.ndarray, preds: np.ndarray, names: list[str], min_count: int
) -> dict[str, dict]:
    """``{value: _one_group(...)}`` of one group column, values sorted (missing ones are ``"unknown"``)."""
    values = list(values)
    if len(values) != labels.shape[0]:
        raise ValueError(f"group column {column!r} has {len(values)} values for {labels.shape[0]} samples")
    keys = np.array([_group_key(v) for v in values], dtype=object)
    per_group = {}
    for key in sorted(set(keys.tolist())):
        mask = keys == key
        per_group[key] = _one_group(labels[mask], preds[mask], names, min_count)
    return per_group


def _compare_groups(per_group: dict[str, dict], min_count: int) -> dict[str, Any]:
    """One column's entry of `per_group_metrics`: its groups, and the worst and best of those with at
    least ``min_count`` samples (of all groups, with a ``note``, when none has that many)."""
    enough = [k for k, g in per_group.items() if not g["too_few"]]
    compared_all = not enough
    candidates = enough or list(per_group)
    entry: dict[str, Any] = {
        "groups": per_group,
        "min_count": int(min_count),
        "compared_all_groups": compared_all,
        "note": (
            f"no group has {min_count} or more samples; worst group and gap are over all groups and are unreliable"
            if compared_all and per_group
            else None
        ),
        "worst_group": None,
        "worst_accuracy": None,
        "best_group": None,
        "accuracy_gap": None,
        "worst_class_recall": None,
    }
    if candidates:
        worst = min(candidates, key=lambda k: (per_group[k]["accuracy"], k))
        best = max(candidates, key=lambda k: (per_group[k]["accuracy"], k))
        entry.update(
            worst_group=worst,
            worst_accuracy=per_group[worst]["accuracy"],
            best_group=best,
            accuracy_gap=float(per_group[best]["accuracy"] - per_group[worst]["accuracy"]),
            worst_class_recall=_worst_class_recall(per_group, candidates),
        )
    return entry


def _worst_class_recall(per_group: dict[str, dict], candidates: Sequence[str]) -> dict[str, Any] | None:
    """``{group, class, recall, n}`` of the lowest per-class recall over the ``candidates`` groups
    (classes without samples in a group are ignored; ties go to the first group, then class, by name)."""
    recalls = [
        (r["recall"], k, c, r["n"])
        for k in candidates
        for c, r in per_group[k]["recall"].items()
        if r["recall"] is not None
    ]
    if not recalls:
        return None
    rec, k, c, n_c = min(recalls, key=lambda t: (t[0], t[1], t[2]))
    return {"group": k, "class": c, "recall": rec, "n": n_c}


def _closest_to_half(low: float, high: float) -> float:
    """The threshold in (low, high] closest to 0.5: every threshold there decides alike."""
    if low < 0.5 <= high:
        return 0.5
    return high if high < 0.5 else float(np.nextafter(low, np.inf))


def equal_recall_threshold(probs, labels) -> float:
    """The threshold ``t`` on ``probs[:, 1]`` (class 1 when ``probs[:, 1] >= t``) that makes the
    recall of class 0 and class 1 on these samples as equal as possible; among equally good
    thresholds the one closest to 0.5 (0.5 itself when it is among them). 0.5 when either class
    is absent. ``probs``: ``(N, 2)`` calibrated probabilities (of the validation split),
    ``labels``: ``(N,)`` in {0, 1}.

    Thresholds between two neighbouring distinct values of ``probs[:, 1]`` decide alike, so each
    such interval is one candidate; recalls are compared exactly, as counts."""
    probs, labels = _as_probs_labels(probs, labels)
    if probs.shape[1] != 2:
        raise ValueError(f"equal_recall_threshold needs two classes, got probs of shape {probs.shape}")
    p1 = probs[:, 1]
    neg, pos = np.sort(p1[labels == 0]), np.sort(p1[labels == 1])
    n0, n1 = len(neg), len(pos)
    if n0 == 0 or n1 == 0:
        return 0.5
    highs = np.append(np.unique(p1), np.inf)  # interval k is (highs[k-1], highs[k]]
    lows = np.append(-np.inf, highs[:-1])
    hits0 = np.searchsorted(neg, highs, side="left")  # class 0 below the threshold: right
    hits1 = n1 - np.searchsorted(pos, highs, side="left")  # class 1 at or above it: right
    gap = np.abs(hits0 * n1 - hits1 * n0)  # |recall0 - recall1| * n0 * n1, exact
    best = np.flatnonzero(gap == gap.min())
    return min((_closest_to_half(lows[k], highs[k]) for k in best), key=lambda t: (abs(t - 0.5), t))


# --------------------------------------------------------------------------------------------
# selective prediction ("uncertain" below a confidence threshold)
# --------------------------------------------------------------------------------------------


def default_thresholds() -> list[float]:
    return [0.0] + [round(t, 2) for t in np.arange(0.5, 0.951, 0.05)] + [0.99]


def selective_metrics(probs, labels, min_confidence: float, preds=None) -> dict[str, Any]:
    """Coverage and accuracy when predictions whose probability (of the predicted class) is below
    ``min_confidence`` are reported as "uncertain". ``preds``: the predicted classes (default: the
    arg-max, whose probability is the top one).

    Returns ``{coverage, accuracy_on_covered, n_covered, n_uncertain, n}``; ``coverage`` is None
    for an empty input and ``accuracy_on_covered`` None when nothing is covered.
    """
    from sklearn import metrics as skm

    probs, labels = _as_probs_labels(probs, labels)
    n = int(probs.shape[0])
    if n == 0:
        return {"coverage": None, "accuracy_on_covered": None, "n_covered": 0, "n_uncertain": 0, "n": 0}
    preds = probs.argmax(axis=1) if preds is None else _as_label_arrays(labels, preds)[1]
    conf = probs[np.arange(n), preds]
    kept = conf >= float(min_confidence)
    n_kept = int(kept.sum())
    acc = float(skm.accuracy_score(labels[kept], preds[kept])) if n_kept else None
    return {"coverage": n_kept / n, "accuracy_on_covered": acc, "n_covered": n_kept, "n_uncertain": n - n_kept, "n": n}


def coverage_curve(probs, labels, thresholds: Sequence[float] | None = None, preds=None) -> list[dict]:
    """Coverage/accuracy trade-off over confidence thresholds.

    Returns one dict per threshold (ascending): ``{threshold, coverage, accuracy, n_kept}`` where
    a sample is kept when the probability of its predicted class (``preds``, default the arg-max)
    is >= threshold; ``accuracy`` is None when nothing is kept. Default thresholds: 0, 0.5, 0.55,
    ..., 0.95, 0.99.
    """
    ts = default_thresholds() if thresholds is None else sorted(float(t) for t in thresholds)
    curve = []
    for t in ts:
        s = selective_metrics(probs, labels, t, preds)
        curve.append(
            {
                "threshold": float(t),
                "coverage": s["coverage"],
                "accuracy": s["accuracy_on_covered"],
                "n_kept": s["n_covered"],
            }
        )
    return curve
