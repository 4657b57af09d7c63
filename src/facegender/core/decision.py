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

import numpy as np

from facegender.core.errors import ConfigError

#: Half-width of the band of probabilities around the decision threshold in which a face is
#: flagged `uncertain` (the model record's `uncertain_band` overrides it).
DEFAULT_UNCERTAIN_BAND = 0.15


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Class probabilities ``softmax(logits / T)`` as an ``(N, C)`` float64 array."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be an (N, C) array, got shape {logits.shape}")
    # numpy's own stable softmax, not scipy.special.softmax: prediction imports this module and
    # must start fast (see the module docstring).
    scaled = logits / float(temperature)
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# the decision: the arg-max, or a threshold on the probability of class 1
# --------------------------------------------------------------------------------------------


def check_threshold(threshold) -> float | None:
    """`threshold` as a float strictly between 0 and 1 (None stays None); ConfigError (a ValueError) otherwise."""
    if threshold is None:
        return None
    t = float(threshold)
    if not 0.0 < t < 1.0:  # also refuses NaN
        raise ConfigError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    return t


def decide(probs, threshold: float | None = None) -> np.ndarray:
    """Predicted class indices ``(N,)`` of calibrated probabilities ``(N, C)``: with two classes
    and a ``threshold``, class 1 where ``probs[:, 1] >= threshold`` and class 0 elsewhere;
    otherwise (no threshold, or more classes) the arg-max."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be an (N, C) array, got shape {probs.shape}")
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(axis=1).astype(np.int64)
    return (probs[:, 1] >= float(threshold)).astype(np.int64)


def uncertain_mask(probs, threshold: float | None = None, band: float = DEFAULT_UNCERTAIN_BAND) -> np.ndarray:
    """Which predictions are flagged uncertain, as a bool ``(N,)`` array: with two classes, those
    with ``|probs[:, 1] - threshold| < band`` (threshold 0.5 when None); with more classes, those
    whose top probability is below ``0.5 + band``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be an (N, C) array, got shape {probs.shape}")
    if probs.shape[1] == 2:
        return np.abs(probs[:, 1] - (0.5 if threshold is None else float(threshold))) < band
    return probs.max(axis=1) < 0.5 + band
