"""Per-image segmentation metrics against hand-counted masks and a brute-force HD95."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from retinafm.stats.bootstrap import bootstrap_samples
from retinafm.stats.segmentation import (
    confusion_counts,
    hd95,
    image_scores,
    mean_foreground,
    summarise_images,
)


def square(shape, top, left, side, value=1, into=None):
    mask = np.zeros(shape, dtype=np.int64) if into is None else into
    mask[top:top + side, left:left + side] = value
    return mask


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> float:
    """HD95 from first principles: boundary pixels found by looking at the 4 neighbours one by one,
    all pairwise distances, nearest per point, 95th percentile of both directions together."""
    def boundary_points(mask):
        padded = np.pad(mask, 1)
        points = []
        for r, c in zip(*np.nonzero(mask), strict=True):
            if not all(padded[r + 1 + dr, c + 1 + dc] for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))):
                points.append((r * spacing[0], c * spacing[1]))
        return np.array(points, dtype=float)

    pa, pb = boundary_points(a), boundary_points(b)
    d = cdist(pa, pb)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def test_two_overlapping_squares_have_the_hand_counted_scores():
    truth = square((20, 20), 2, 2, 6)  # 36 pixels
    pred = square((20, 20), 4, 4, 6)  # 36 pixels, overlap rows/cols 4..7: 16 pixels
    counts = confusion_counts(truth, pred, 2)
    assert counts["tp"].tolist() == [400 - 56, 16]
    assert counts["fp"].tolist() == [20, 20] and counts["fn"].tolist() == [20, 20]
    s = image_scores(truth, pred, 2)
    assert s["dice"][1] == pytest.approx(2 * 16 / 72)
    assert s["iou"][1] == pytest.approx(16 / 56)
    assert s["sensitivity"][1] == pytest.approx(16 / 36)
    assert s["precision"][1] == pytest.approx(16 / 36)
    assert s["dice"][0] == pytest.approx(2 * 344 / (2 * 344 + 40))
    # Dice and IoU are tied: D = 2J / (1 + J)
    assert s["dice"][1] == pytest.approx(2 * s["iou"][1] / (1 + s["iou"][1]))


def test_ignored_pixels_count_for_no_class():
    truth = square((10, 10), 0, 0, 4)
    truth[8:, :] = 255  # 20 unlabelled pixels
    pred = truth.copy()
    pred[8:, :] = 1  # whatever is predicted there does not matter
    pred[truth == 255] = 1
    s = image_scores(truth, pred, 2, ignore_index=255)
    assert s["dice"].tolist() == [1.0, 1.0] and s["hd95"][1] == 0.0
    counts = confusion_counts(truth, pred, 2, ignore_index=255)
    assert counts["tp"].sum() == 80 and counts["fp"].sum() == 0
    with pytest.raises(ValueError, match="255"):  # without ignore_index 255 is an unknown class
        confusion_counts(truth, pred, 2)


def test_unknown_class_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match=r"\[3\]"):
        confusion_counts(np.zeros((4, 4), int), np.full((4, 4), 3), 3)
    with pytest.raises(ValueError, match="shape"):
        image_scores(np.zeros((4, 4), int), np.zeros((4, 5), int), 2)


def test_absent_class_conventions():
    truth = square((12, 12), 1, 1, 4, value=1)
    pred = square((12, 12), 1, 1, 4, value=1)
    square((12, 12), 7, 7, 3, value=2, into=pred)  # class 2 predicted, not in truth
    square((12, 12), 7, 1, 3, value=3, into=truth)  # class 3 in truth, not predicted
    s = image_scores(truth, pred, 5)  # class 4 absent from both
    nan = math.isnan
    assert all(nan(s[m][4]) for m in ("dice", "iou", "sensitivity", "precision", "hd95"))
    assert s["dice"][2] == 0 and s["iou"][2] == 0 and s["precision"][2] == 0
    assert nan(s["sensitivity"][2]) and nan(s["hd95"][2])
    assert s["dice"][3] == 0 and s["iou"][3] == 0 and s["sensitivity"][3] == 0
    assert nan(s["precision"][3]) and nan(s["hd95"][3])
    assert s["in_truth"].tolist() == [True, True, False, True, False]
    assert s["in_pred"].tolist() == [True, True, True, False, False]
    means = mean_foreground(s)
    assert means["dice"] == pytest.approx((1 + 0 + 0) / 3)  # class 4 left out, background left out
    assert means["sensitivity"] == pytest.approx(0.5)  # classes 1 and 3
    assert means["hd95"] == 0.0
    assert mean_foreground(s, background=None)["dice"] == pytest.approx((s["dice"][0] + 1) / 4)


def test_all_undefined_foreground_mean_is_nan_without_warning(recwarn):
    s = image_scores(np.zeros((5, 5), int), np.zeros((5, 5), int), 3)
    assert all(math.isnan(v) for v in mean_foreground(s).values())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_a_square_shifted_by_k_pixels_is_k(k):
    truth = square((30, 30), 5, 5, 12)
    pred = square((30, 30), 5, 5 + k, 12)
    assert image_scores(truth, pred, 2)["hd95"][1] == pytest.approx(k)
    assert brute_hd95(truth == 1, pred == 1) == pytest.approx(k)


def test_hd95_of_concentric_squares_is_the_gap():
    k = 2
    truth = square((60, 60), 10, 10, 40)
    pred = square((60, 60), 10 - k, 10 - k, 40 + 2 * k)
    # Every inner boundary pixel is k from the outer ring; outer pixels near the corners are
    # farther (up to k*sqrt(2)) but are fewer than 5% of the points.
    assert hd95(truth == 1, pred == 1) == pytest.approx(k)
    assert brute_hd95(truth == 1, pred == 1) == pytest.approx(k)


def test_identical_masks_have_zero_distance_and_spacing_scales_it():
    truth = square((20, 20), 3, 3, 7)
    assert image_scores(truth, truth, 2)["hd95"][1] == 0.0
    pred = square((20, 20), 3, 6, 7)  # shifted 3 columns
    assert image_scores(truth, pred, 2, spacing=(2.0, 0.5))["hd95"][1] == pytest.approx(1.5)
    pred = square((20, 20), 6, 3, 7)  # shifted 3 rows
    assert image_scores(truth, pred, 2, spacing=(2.0, 0.5))["hd95"][1] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="spacing"):
        hd95(truth == 1, pred == 1, spacing=(1.0,))


def test_random_masks_match_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(4):
        truth = (rng.random((24, 31)) < 0.3).astype(int) + (rng.random((24, 31)) < 0.2)
        pred = (rng.random((24, 31)) < 0.3).astype(int) + (rng.random((24, 31)) < 0.2)
        truth, pred = np.clip(truth, 0, 2), np.clip(pred, 0, 2)
        spacing = (0.7, 1.3)
        s = image_scores(truth, pred, 3, spacing=spacing)
        for c in range(3):
            t, p = truth == c, pred == c
            tp, fp, fn = (t & p).sum(), (~t & p).sum(), (t & ~p).sum()
            assert s["dice"][c] == pytest.approx(2 * tp / (2 * tp + fp + fn))
            assert s["iou"][c] == pytest.approx(tp / (tp + fp + fn))
            assert s["hd95"][c] == pytest.approx(brute_hd95(t, p, spacing))


def _images(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        truth = square((16, 16), 4, 4, 6)
        pred = square((16, 16), 4 + int(rng.integers(0, 3)), 4 + int(rng.integers(0, 3)), 6)
        out.append(image_scores(truth, pred, 2))
    return out


def test_summary_means_and_intervals_bracket_them():
    per_image = _images(30, seed=0)
    summary = summarise_images(per_image, ["background", "lesion"], replicates=200, seed=1)
    dice = np.array([s["dice"][1] for s in per_image])
    lesion = summary["lesion"]["dice"]
    assert lesion["mean"] == pytest.approx(dice.mean()) and lesion["images"] == 30
    assert lesion["ci_low"] < lesion["mean"] < lesion["ci_high"]
    # mean foreground with one foreground class equals that class's mean
    assert summary["mean_foreground"]["dice"]["mean"] == pytest.approx(dice.mean())
    # the interval is the percentile interval of the resampled means (independently recomputed)
    means = [dice[rows].mean() for rows in bootstrap_samples(30, 200, 1)]
    assert (lesion["ci_low"], lesion["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert set(summary) == {"background", "lesion", "mean_foreground"}
    assert set(summary["lesion"]) == {"dice", "iou", "sensitivity", "precision", "hd95"}


def test_summary_resamples_whole_patients():
    per_image = _images(20, seed=4)
    patients = [f"p{i // 4}" for i in range(20)]
    summary = summarise_images(per_image, ["bg", "lesion"], replicates=100, seed=2, groups=patients)
    dice = np.array([s["dice"][1] for s in per_image])
    means = [dice[rows].mean() for rows in bootstrap_samples(20, 100, 2, groups=np.array(patients))]
    lesion = summary["lesion"]["dice"]
    assert (lesion["ci_low"], lesion["ci_high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    none = summarise_images(per_image, ["bg", "lesion"], replicates=0)
    assert math.isnan(none["lesion"]["dice"]["ci_low"]) and none["lesion"]["dice"]["mean"] == lesion["mean"]


def test_summary_leaves_undefined_images_out_of_the_mean():
    truth = square((8, 8), 1, 1, 3)
    per_image = [image_scores(truth, truth, 3), image_scores(truth, np.zeros_like(truth), 3)]
    summary = summarise_images(per_image, ["bg", "a", "b"], replicates=50)
    assert summary["a"]["dice"]["mean"] == 0.5 and summary["a"]["dice"]["images"] == 2
    assert math.isnan(summary["b"]["dice"]["mean"]) and summary["b"]["dice"]["images"] == 0
    assert summary["a"]["hd95"]["images"] == 1 and summary["a"]["hd95"]["mean"] == 0.0
