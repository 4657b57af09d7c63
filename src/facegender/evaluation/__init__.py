"""Judging a model: the predictions record of a labelled set, metrics, calibration, per-group
results, plots and the HTML report. Torch-free (scikit-learn, SciPy and matplotlib)."""
