"""Per-image segmentation metrics (Dice, IoU, sensitivity, precision, HD95) and their summary over images.

Scores are computed image by image and then averaged, not pooled over all pixels of a test set:
a large lesion would otherwise outweigh many small ones, and the bootstrap needs one value per
image (resampled by image, or by patient when images share one) to give honest intervals.

Conventions for classes missing from an image (after ignored pixels are removed), chosen so that
"nothing to find and nothing found" does not count as a perfect score and is left out of means:

=====================  =====  =====  ===========  =========  =====
case                   dice   iou    sensitivity  precision  hd95
=====================  =====  =====  ===========  =========  =====
absent in both         NaN    NaN    NaN          NaN        NaN
predicted, not in truth  0    0      NaN          0          NaN
in truth, not predicted  0    0      0            NaN        NaN
=====================  =====  =====  ===========  =========  =====

HD95 has no finite value when either side is empty; it is NaN rather than inf (an inf would make
every mean inf). Because a NaN HD95 is left out of means, `image_scores` also returns the flags
`in_truth` and `in_pred` so a report can count the images where a class was missed or invented.

HD95 follows medpy's `hd95`: the 95th percentile of the union of both directed surface distances
(boundary pixels of truth to the nearest boundary pixel of the prediction, and back). MONAI's
`compute_hausdorff_distance(percentile=95)` instead takes the larger of the two directed 95th
percentiles, which can be a little larger. Boundaries are the mask pixels with a 4-connected
neighbour outside the mask (the image edge counts as outside), as in medpy.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from retinafm.stats.bootstrap import bootstrap_ci, bootstrap_samples

METRICS = ("dice", "iou", "sensitivity", "precision", "hd95")


def _check_masks(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                 ignore_index: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, pred, valid) as integer arrays; raises when shapes differ or an index is out of range,
    since a silently dropped class index would make every count wrong."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth has shape {truth.shape} but prediction {pred.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    valid = np.ones(truth.shape, dtype=bool) if ignore_index is None else truth != ignore_index
    for name, mask in (("truth", truth[valid]), ("prediction", pred[valid])):
        if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
            bad = sorted(set(np.unique(mask[(mask < 0) | (mask >= num_classes)]).tolist()))
            raise ValueError(f"{name} has class indices {bad} outside 0..{num_classes - 1}")
    return truth.astype(np.int64), pred.astype(np.int64), valid


def confusion_counts(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = None) -> dict[str, np.ndarray]:
    """Per-class true positives, false positives and false negatives of one image.

    Pixels whose truth equals `ignore_index` are left out whatever was predicted there (they are
    unlabelled). Returns {"tp", "fp", "fn"}, each an int array of length `num_classes`.
    """
    truth, pred, valid = _check_masks(truth, pred, num_classes, ignore_index)
    t, p = truth[valid], pred[valid]
    confusion = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)  # rows truth, columns prediction
    tp = np.diag(confusion).copy()
    return {"tp": tp, "fp": confusion.sum(axis=0) - tp, "fn": confusion.sum(axis=1) - tp}


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-connected neighbour outside it (the image edge counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Distances (in spacing units) from each boundary pixel of `a` to the nearest boundary pixel of
    `b`; both masks must be non-empty. One Euclidean distance transform replaces a pairwise search."""
    to_b = ndimage.distance_transform_edt(~_boundary(b), sampling=tuple(float(s) for s in spacing))
    return to_b[_boundary(a)]


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two boolean masks (medpy's definition:
    percentile of the union of both directed distances); NaN when either mask is empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if len(spacing) != a.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {a.ndim}-D mask")
    if not a.any() or not b.any():
        return math.nan
    distances = np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])
    return float(np.percentile(distances, 95))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(len(numerator), math.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def image_scores(truth: np.ndarray, pred: np.ndarray, num_classes: int, *, ignore_index: int | None = None,
                 spacing: Sequence[float] = (1.0, 1.0)) -> dict[str, np.ndarray]:
    """Per-class scores of one image: {"dice", "iou", "sensitivity", "precision", "hd95"} (float
    arrays of length `num_classes`, NaN where undefined; see the module docstring) and the flags
    {"in_truth", "in_pred"} (bool arrays: the class has labelled pixels in the truth / prediction).

    `spacing` is the pixel size per axis (rows, columns), e.g. in mm, so HD95 comes in those units.
    Pixels labelled `ignore_index` in the truth count for no class, in the counts and the HD95.
    """
    counts = confusion_counts(truth, pred, num_classes, ignore_index)
    tp, fp, fn = (counts[k].astype(float) for k in ("tp", "fp", "fn"))
    in_truth, in_pred = (tp + fn) > 0, (tp + fp) > 0
    truth, pred, valid = _check_masks(truth, pred, num_classes, ignore_index)
    distances = np.full(num_classes, math.nan)
    for c in np.flatnonzero(in_truth & in_pred):
        distances[c] = hd95((truth == c) & valid, (pred == c) & valid, spacing)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "hd95": distances,
        "in_truth": in_truth,
        "in_pred": in_pred,
    }


def _nanmean(values: np.ndarray, axis: int | None = None):
    """np.nanmean without the 'mean of empty slice' warning: all-NaN gives NaN, which is the answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def mean_foreground(scores: dict[str, np.ndarray], background: int | None = 0) -> dict[str, float]:
    """Each metric's mean over the foreground classes of one image, leaving out undefined (NaN)
    classes: a class absent from both truth and prediction neither helps nor hurts. `background`
    is the class index left out (None keeps every class)."""
    out: dict[str, float] = {}
    for metric in METRICS:
        values = np.asarray(scores[metric], dtype=float)
        keep = np.ones(len(values), dtype=bool)
        if background is not None:
            keep[background] = False
        out[metric] = float(_nanmean(values[keep]))
    return out


def summarise_images(
    per_image: Sequence[dict[str, np.ndarray]],
    class_names: Sequence[str],
    *,
    replicates: int = 1000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
    background: int | None = 0,
    level: float = 0.95,
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean of each metric over images, per class and for the per-image foreground mean, with
    percentile bootstrap CIs over images (whole patients when `groups` gives each image's patient).

    Returns {class name or "mean_foreground": {metric: {"mean", "ci_low", "ci_high", "images"}}},
    where "images" counts the images where the value is defined. `replicates=0` gives NaN CIs.
    """
    n = len(per_image)
    if n == 0:
        raise ValueError("no images to summarise")
    names = list(class_names)
    table: dict[str, np.ndarray] = {}  # "<metric>/<column>" -> one value per image
    for metric in METRICS:
        matrix = np.array([np.asarray(s[metric], dtype=float) for s in per_image])
        if matrix.shape != (n, len(names)):
            raise ValueError(f"{metric} scores have shape {matrix.shape}, expected {(n, len(names))}")
        for c, name in enumerate(names):
            table[f"{metric}/{name}"] = matrix[:, c]
    foreground = [mean_foreground(s, background) for s in per_image]
    for metric in METRICS:
        table[f"{metric}/mean_foreground"] = np.array([f[metric] for f in foreground])

    def statistic(rows: np.ndarray) -> dict[str, float]:
        return {key: float(_nanmean(values[rows])) for key, values in table.items()}

    if replicates > 0:
        group_array = None if groups is None else np.asarray(groups)
        samples = bootstrap_samples(n, replicates, seed, groups=group_array)
        intervals = bootstrap_ci(statistic, samples, level=level)
    else:
        intervals = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key, values in table.items():
        metric, column = key.split("/", 1)
        low, high = intervals.get(key, (math.nan, math.nan))
        summary.setdefault(column, {})[metric] = {
            "mean": float(_nanmean(values)), "ci_low": low, "ci_high": high,
            "images": int(np.isfinite(values).sum()),
        }
    return summary
