"""Calibration of predicted probabilities: reliability bins and the expected calibration error
(ECE), as pure functions on arrays.

Bins are equal-width on [0, 1]: bin i holds probabilities in [i/B, (i+1)/B), and the last bin is
closed so a probability of exactly 1 is counted. An outcome of NaN means "unknown" and its row is
left out, as everywhere else in the metrics.
"""
from __future__ import annotations

import numpy as np

# Softmax/sigmoid outputs in float32 can land a hair outside [0, 1]; beyond this it is a bug.
_TOLERANCE = 1e-6


def calibration_bins(outcome: np.ndarray, prob: np.ndarray,
                     n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (mean predicted probability, observed frequency of the outcome, count).

    `outcome` is 0/1 (NaN: unknown, dropped), `prob` the predicted probability of outcome 1.
    Empty bins have NaN mean and frequency and a count of 0; arrays have length `n_bins`.
    """
    outcome, prob = _known_rows(outcome, prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="right": a probability on an edge belongs to the bin it opens; 1.0 is clipped into the last.
    index = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins become NaN
        mean_prob = np.bincount(index, weights=prob, minlength=n_bins) / count
        frequency = np.bincount(index, weights=outcome, minlength=n_bins) / count
    return mean_prob, frequency, count


def expected_calibration_error(outcome: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Sum over bins of count/N × |observed frequency − mean predicted probability| over the rows
    with a known outcome; NaN when there are none."""
    mean_prob, frequency, count = calibration_bins(outcome, prob, n_bins)
    total = count.sum()
    if total == 0:
        return float("nan")
    filled = count > 0
    return float(np.sum(count[filled] / total * np.abs(frequency[filled] - mean_prob[filled])))


def _known_rows(outcome: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outcome = np.asarray(outcome, dtype=np.float64).reshape(-1)
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if outcome.shape != prob.shape:
        raise ValueError(f"{outcome.size} outcomes but {prob.size} probabilities")
    known = ~np.isnan(outcome)
    outcome, prob = outcome[known], prob[known]
    if not np.isin(outcome, (0.0, 1.0)).all():
        raise ValueError(f"outcomes must be 0, 1 or NaN (unknown); got {np.unique(outcome).tolist()[:10]}")
    if np.isnan(prob).any() or (prob < -_TOLERANCE).any() or (prob > 1 + _TOLERANCE).any():
        raise ValueError("probabilities must be numbers in [0, 1]")
    return outcome, np.clip(prob, 0.0, 1.0)
