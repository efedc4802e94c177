"""DeLong's test: a hand-worked example, a published AUC, and the O(m*n) definition."""
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from retinafm.stats.delong import (
    delong_auc_variance,
    delong_test,
    structural_components,
)


def test_hand_worked_example():
    """Three positives, three negatives, ties included; worked by hand from DeLong et al. (1988).

    a: positives 0.8 0.6 0.3, negatives 0.5 0.3 0.1  -> V10 = 1, 1, 1/2     V01 = 2/3, 5/6, 1   AUC 5/6
    b: positives 0.9 0.35 0.7, negatives 0.2 0.4 0.6 -> V10 = 1, 1/3, 1     V01 = 1, 2/3, 2/3   AUC 7/9
    S10 = [[1/12, -1/18], [-1/18, 4/27]], S01 = [[1/36, -1/36], [-1/36, 1/27]], S = S10/3 + S01/3
    Var(b - a) = 1/27 + 5/81 + 2/36 = 25/162; z = (-1/18) / sqrt(25/162) = -sqrt(2)/10.
    """
    y = np.array([1, 1, 1, 0, 0, 0])
    a = [0.8, 0.6, 0.3, 0.5, 0.3, 0.1]
    b = [0.9, 0.35, 0.7, 0.2, 0.4, 0.6]
    aucs, v10, v01 = structural_components(y, a, b)
    np.testing.assert_allclose(v10, [[1, 1, 0.5], [1, 1 / 3, 1]])
    np.testing.assert_allclose(v01, [[2 / 3, 5 / 6, 1], [1, 2 / 3, 2 / 3]])
    np.testing.assert_allclose(aucs, [5 / 6, 7 / 9])
    result = delong_test(y, a, b)
    assert (result.auc_a, result.auc_b) == pytest.approx((5 / 6, 7 / 9))
    assert result.difference == pytest.approx(-1 / 18)
    assert result.variance == pytest.approx(25 / 162)
    assert result.z == pytest.approx(-math.sqrt(2) / 10)
    assert result.p_value == pytest.approx(2 * norm.sf(math.sqrt(2) / 10))
    half = 1.959963984540054 * math.sqrt(25 / 162)
    assert (result.ci_low, result.ci_high) == pytest.approx((-1 / 18 - half, -1 / 18 + half))


def test_published_rating_example_auc():
    """Hanley & McNeil (1982), Radiology 143:29-36, Table 1: 109 CT images rated 1-5 by one reader
    (58 normal: 33 6 6 11 2; 51 abnormal: 3 2 2 11 33); published area 0.893, SE 0.032 by their
    approximation, which DeLong's unbiased estimate should be close to."""
    ratings = np.arange(1, 6)
    y = np.r_[np.zeros(58), np.ones(51)]
    score = np.r_[np.repeat(ratings, [33, 6, 6, 11, 2]), np.repeat(ratings, [3, 2, 2, 11, 33])]
    auc, variance = delong_auc_variance(y, score)
    assert round(auc, 3) == 0.893
    assert math.sqrt(variance) == pytest.approx(0.032, abs=0.003)


def _definition(y, score):
    """DeLong et al.'s structural components straight from the kernel psi, in exact fractions."""
    pos = [Fraction(s) for s, t in zip(score, y, strict=True) if t]
    neg = [Fraction(s) for s, t in zip(score, y, strict=True) if not t]

    def psi(x, z):
        return Fraction(1) if x > z else Fraction(1, 2) if x == z else Fraction(0)

    v10 = [sum(psi(x, z) for z in neg) / len(neg) for x in pos]
    v01 = [sum(psi(x, z) for x in pos) / len(pos) for z in neg]
    return v10, v01


def _cov(u, v):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    return sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True)) / (len(u) - 1)


def test_matches_the_quadratic_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(70) < 0.4
    a = np.round(rng.normal(y * 1.0, 1.0), 1)  # rounded: many ties
    b = np.round(0.5 * a + rng.normal(y * 0.8, 1.0), 1)
    va10, va01 = _definition(y, [Fraction(str(v)) for v in a])
    vb10, vb01 = _definition(y, [Fraction(str(v)) for v in b])
    m, n = len(va10), len(va01)
    var_a = _cov(va10, va10) / m + _cov(va01, va01) / n
    var_b = _cov(vb10, vb10) / m + _cov(vb01, vb01) / n
    cov = _cov(va10, vb10) / m + _cov(va01, vb01) / n
    result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(float(sum(va10) / m)) == pytest.approx(roc_auc_score(y, a))
    assert result.auc_b == pytest.approx(roc_auc_score(y, b))
    assert result.variance == pytest.approx(float(var_a + var_b - 2 * cov), rel=1e-9)
    assert delong_auc_variance(y, a)[1] == pytest.approx(float(var_a), rel=1e-9)


def test_symmetry_identity_and_order_invariance():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    a, b = rng.normal(y * 0.5, 1), rng.normal(y * 1.5, 1)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ab.difference == pytest.approx(-ba.difference) and ab.p_value == pytest.approx(ba.p_value)
    assert ab.difference > 0 and ab.p_value < 0.01 and ab.ci_low > 0
    order = rng.permutation(200)
    assert delong_test(y[order], a[order], b[order]).p_value == pytest.approx(ab.p_value)
    same = delong_test(y, a, a)
    assert same.difference == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="both positive and negative"):
        delong_test(np.ones(5), np.arange(5), np.arange(5))
    with pytest.raises(ValueError, match="binary outcome"):
        delong_test(np.array([0, 1, 2]), np.arange(3), np.arange(3))
    with pytest.raises(ValueError, match="4 scores for 3 outcomes"):
        delong_test(np.array([0, 1, 1]), np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="non-finite"):
        delong_test(np.array([0, 1, 1]), [0.1, np.nan, 0.3], [0.1, 0.2, 0.3])
