"""Reliability bins and ECE: a hand computation, synthetic calibrated / overconfident models,
and agreement with scikit-learn's calibration_curve."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from retinafm.stats.calibration import calibration_bins, expected_calibration_error


def test_bins_and_ece_by_hand():
    outcome = np.array([0, 0, 1, 1, 1, np.nan, 0, 1])
    prob = np.array([0.05, 0.15, 0.12, 0.55, 0.58, 0.99, 0.95, 1.0])  # the NaN row is dropped
    mean, freq, count = calibration_bins(outcome, prob, n_bins=5)
    # bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]
    assert count.tolist() == [3, 0, 2, 0, 2]
    np.testing.assert_allclose(mean[[0, 2, 4]], [(0.05 + 0.15 + 0.12) / 3, (0.55 + 0.58) / 2, (0.95 + 1.0) / 2])
    np.testing.assert_allclose(freq[[0, 2, 4]], [1 / 3, 1.0, 0.5])
    assert np.isnan(mean[[1, 3]]).all() and np.isnan(freq[[1, 3]]).all()
    expected = (3 * abs(1 / 3 - 0.32 / 3) + 2 * abs(1.0 - 0.565) + 2 * abs(0.5 - 0.975)) / 7
    assert expected_calibration_error(outcome, prob, n_bins=5) == pytest.approx(expected, abs=1e-12)


def test_edges_go_to_the_bin_they_open_and_one_to_the_last():
    _, _, count = calibration_bins(np.array([0, 1, 1, 0]), np.array([0.0, 0.5, 1.0, 0.25]), n_bins=2)
    assert count.tolist() == [2, 2]


def test_empty_or_unknown_input_gives_nan():
    assert np.isnan(expected_calibration_error(np.array([]), np.array([])))
    assert np.isnan(expected_calibration_error(np.array([np.nan, np.nan]), np.array([0.2, 0.9])))
    mean, freq, count = calibration_bins(np.array([]), np.array([]), n_bins=3)
    assert count.tolist() == [0, 0, 0] and np.isnan(mean).all() and np.isnan(freq).all()


def test_perfectly_calibrated_model_has_small_ece():
    rng = np.random.default_rng(0)
    prob = rng.random(200_000)
    outcome = (rng.random(prob.size) < prob).astype(float)
    assert expected_calibration_error(outcome, prob) < 0.01


def test_overconfident_model_has_large_ece():
    rng = np.random.default_rng(1)
    truth = rng.random(50_000)
    outcome = (rng.random(truth.size) < truth).astype(float)
    # Pushed towards 0 and 1: says 0.95 when the truth is 0.7.
    prob = 1 / (1 + np.exp(-4 * np.log(truth / (1 - truth))))
    assert expected_calibration_error(outcome, prob) > 0.1


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_bins_agree_with_sklearn(n_bins):
    rng = np.random.default_rng(n_bins)
    prob = rng.beta(2, 5, 3000)  # skewed: some high bins stay empty at 15 bins
    outcome = (rng.random(prob.size) < prob).astype(float)
    mean, freq, count = calibration_bins(outcome, prob, n_bins)
    sk_freq, sk_mean = calibration_curve(outcome, prob, n_bins=n_bins, strategy="uniform")
    filled = count > 0
    np.testing.assert_allclose(freq[filled], sk_freq)
    np.testing.assert_allclose(mean[filled], sk_mean)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        expected_calibration_error(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([0, 1]), np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="outcomes but"):
        calibration_bins(np.array([0, 1]), np.array([0.1]))
