"""Bootstrap replicates (stratified, patient-level), percentile CIs and the paired test."""
import math
import pickle

import numpy as np
import pytest

from retinafm.stats.bootstrap import bootstrap_ci, bootstrap_samples, paired_bootstrap


def test_replicates_are_seeded_and_independent_of_how_they_are_drawn():
    samples = bootstrap_samples(50, 20, seed=7)
    assert len(samples) == 20
    first = [rows.copy() for rows in samples]
    assert all(np.array_equal(a, b) for a, b in zip(first, bootstrap_samples(50, 20, seed=7), strict=True))
    assert np.array_equal(samples[3], first[3]) and np.array_equal(samples[-1], first[-1])
    assert not np.array_equal(first[0], bootstrap_samples(50, 20, seed=8)[0])
    assert not np.array_equal(first[0], first[1])
    assert all(len(rows) == 50 and rows.min() >= 0 and rows.max() < 50 for rows in first)
    assert np.array_equal(pickle.loads(pickle.dumps(samples))[5], first[5])
    with pytest.raises(IndexError):
        samples[20]


def test_stratified_replicates_keep_every_class_size():
    y = np.array([0] * 40 + [1] * 7 + [2] * 3)
    for rows in bootstrap_samples(len(y), 50, seed=1, strata=y):
        assert np.bincount(y[rows], minlength=3).tolist() == [40, 7, 3]


def test_patient_replicates_draw_whole_patients():
    patients = np.array([f"p{i // 3}" for i in range(30)] + ["solo"])  # 10 patients with 3 images, one with 1
    sizes = set()
    for rows in bootstrap_samples(len(patients), 40, seed=2, groups=patients):
        drawn = patients[rows]
        for p in set(drawn):
            count = int((drawn == p).sum())
            own = int((patients == p).sum())
            assert count % own == 0  # a patient comes with all their images, possibly several times
            # and each of their images as often as the others
            assert len(set(np.bincount(rows[drawn == p]).tolist()) - {0}) == 1
        sizes.add(len(rows))
    assert len(sizes) > 1  # the number of images varies with the patients drawn

    # Stratified by the class of each patient's first image: 5 patients of class 1 (3 images each)
    # are drawn in every replicate.
    y = np.array([0] * 15 + [1] * 15 + [0])
    for rows in bootstrap_samples(len(y), 20, seed=3, strata=y, groups=patients):
        assert int((y[rows] == 1).sum()) == 15


def test_percentile_interval_is_that_of_the_replicates():
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, 400)
    samples = bootstrap_samples(len(x), 300, seed=4)
    ci = bootstrap_ci(lambda rows: {"mean": x[rows].mean(), "sd": x[rows].std()}, samples, level=0.9)
    means = [x[rows].mean() for rows in samples]
    assert ci["mean"] == pytest.approx(tuple(np.percentile(means, [5, 95])))
    # About +-1.645 standard errors around the sample mean.
    assert ci["mean"][1] - ci["mean"][0] == pytest.approx(2 * 1.645 * 2.0 / 20, rel=0.2)
    assert ci["mean"][0] < x.mean() < ci["mean"][1]
    parallel = bootstrap_ci(lambda rows: {"mean": x[rows].mean(), "sd": x[rows].std()}, samples, level=0.9,
                            n_jobs=2)
    assert parallel == ci


def test_undefined_replicates_are_left_out_or_void_the_interval():
    x = np.arange(100.0)

    def statistic(rows):
        return {"mostly": math.nan if rows[0] % 4 else x[rows].mean(),  # defined in ~1/4 of replicates
                "sometimes": math.nan if rows[0] % 4 == 0 else x[rows].mean()}

    ci = bootstrap_ci(statistic, bootstrap_samples(100, 200, seed=5))
    assert all(math.isnan(v) for v in ci["mostly"])
    assert ci["sometimes"][0] < 49.5 < ci["sometimes"][1]
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_ci(statistic, bootstrap_samples(100, 10), level=95)


def test_paired_bootstrap_difference_interval_and_p_value():
    rng = np.random.default_rng(6)
    truth = rng.normal(0, 1, 300)
    near, far = truth + rng.normal(0, 0.3, 300), truth + rng.normal(0, 1.0, 300)

    def error(pred, rows):
        return float(np.mean((pred[rows] - truth[rows]) ** 2))

    samples = bootstrap_samples(300, 400, seed=0)
    everything = np.arange(300)
    result = paired_bootstrap(lambda rows: (error(far, rows), error(near, rows)), samples,
                              full=(error(far, everything), error(near, everything)))
    diffs = [error(near, rows) - error(far, rows) for rows in samples]
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert result.difference == pytest.approx(result.b - result.a) and result.difference < 0
    assert result.p_value == pytest.approx(1 / 401) and result.replicates == 400  # never below 1/(B+1)

    same = paired_bootstrap(lambda rows: (error(far, rows), error(far, rows)), samples, full=(1.0, 1.0))
    assert same.difference == 0 and same.p_value == 1 and same.ci_low == same.ci_high == 0

    # A coin flip between two equally good predictors: a large p-value.
    twin = truth + rng.normal(0, 1.0, 300)
    null = paired_bootstrap(lambda rows: (error(far, rows), error(twin, rows)), samples,
                            full=(error(far, everything), error(twin, everything)))
    assert null.p_value == pytest.approx(2 * min(np.mean(np.array(
        [error(twin, r) - error(far, r) for r in samples]) <= 0), np.mean(np.array(
            [error(twin, r) - error(far, r) for r in samples]) >= 0)))
    assert null.ci_low < 0 < null.ci_high


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_samples(0, 10)
    with pytest.raises(ValueError, match="at least 1"):
        bootstrap_samples(10, 0)
    with pytest.raises(ValueError, match="strata has 3 entries for 10 items"):
        bootstrap_samples(10, 5, strata=np.arange(3))
