"""DeLong's test for two correlated ROC curves (same cases, two scores).

DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:837-845: each AUC is a Mann-Whitney
statistic; its variance and the two AUCs' covariance come from the per-case "structural
components" (placement values). They are computed here from mid-ranks as in Sun & Xu (2014),
IEEE Signal Processing Letters 21:1389-1393, in O(N log N) instead of O(m * n) comparisons,
which matters for test sets of tens of thousands of images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata


@dataclass(frozen=True)
class DeLongResult:
    auc_a: float
    auc_b: float
    difference: float  # auc_b - auc_a
    variance: float  # of the difference
    z: float
    p_value: float  # two-sided
    ci_low: float
    ci_high: float


def _split(y: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"DeLong's test needs one binary outcome per case, got shape {y.shape}")
    values = np.unique(y)
    if len(values) != 2 and not (len(values) == 1 and values[0] in (0, 1, True, False)):
        raise ValueError(f"DeLong's test needs a binary outcome; got values {values[:5].tolist()}")
    positive = y == values.max() if len(values) == 2 else y.astype(bool)
    if positive.all() or not positive.any():
        raise ValueError("DeLong's test needs both positive and negative cases")
    matrix = np.vstack([np.asarray(s, dtype=float) for s in scores])
    if matrix.shape[1] != len(y):
        raise ValueError(f"{matrix.shape[1]} scores for {len(y)} outcomes")
    if not np.isfinite(matrix).all():
        raise ValueError("DeLong's test got non-finite scores")
    return matrix[:, positive], matrix[:, ~positive]


def structural_components(y: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(aucs, v10, v01) for each score: v10[k, i] is the share of negatives that positive i
    outranks under score k (ties count half); v01[k, j] the share of positives that outrank
    negative j."""
    pos, neg = _split(y, *scores)
    m, n = pos.shape[1], neg.shape[1]
    both = np.hstack([pos, neg])
    overall = np.vstack([rankdata(row) for row in both])
    within_pos = np.vstack([rankdata(row) for row in pos])
    within_neg = np.vstack([rankdata(row) for row in neg])
    # Mid-rank among all minus mid-rank among positives = negatives below (ties half).
    v10 = (overall[:, :m] - within_pos) / n
    v01 = 1.0 - (overall[:, m:] - within_neg) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def _covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(v10), len(v10)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(v01), len(v01)))
    return s10 / m + s01 / n


def delong_auc_variance(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """One score's AUC and DeLong's estimate of its variance."""
    aucs, v10, v01 = structural_components(y, score)
    return float(aucs[0]), float(_covariance(v10, v01)[0, 0])


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> DeLongResult:
    """Two-sided test of AUC(b) = AUC(a) for two scores of the same cases, with the CI of the
    difference b - a (normal approximation, as in pROC's roc.test)."""
    aucs, v10, v01 = structural_components(y, score_a, score_b)
    cov = _covariance(v10, v01)
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    difference = float(aucs[1] - aucs[0])
    if variance <= 1e-15:  # identical rankings (or perfect separation by both): no spread to test
        z = 0.0 if abs(difference) < 1e-12 else math.copysign(math.inf, difference)
        p_value = 1.0 if z == 0 else 0.0
        return DeLongResult(float(aucs[0]), float(aucs[1]), difference, max(variance, 0.0), z, p_value,
                            difference, difference)
    se = math.sqrt(variance)
    z = difference / se
    half = float(norm.ppf(0.5 + level / 2)) * se
    return DeLongResult(float(aucs[0]), float(aucs[1]), difference, variance, z, float(2 * norm.sf(abs(z))),
                        difference - half, difference + half)
