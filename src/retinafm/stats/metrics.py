"""Multi-class, multi-label and regression metrics as pure functions on arrays, computed by
scikit-learn (and scipy for Pearson's r).

Per-class metrics are one-vs-rest. A class with no positives (or no negatives) in the evaluated
set has an undefined AUROC/AUPRC (and possibly sensitivity/specificity): it is reported as NaN,
with a warning for the AUROC/AUPRC, and macro averages are taken over the classes where the
metric is defined. Multi-label and regression targets are (N, L) floats where NaN means "unknown
for this image": each label/target is evaluated on its own known rows only, with the same NaN
and macro-average rules.
"""
from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from retinafm.stats.calibration import expected_calibration_error


class _OnFirstUse:
    """A module imported when first used: scikit-learn and scipy take seconds to import, and
    predict and embed, which import the tasks (and so this module), never compute a metric."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


_sklearn = _OnFirstUse("sklearn.metrics")
_scipy_stats = _OnFirstUse("scipy.stats")

# Youden thresholds are kept inside (0, 1): roc_curve's first threshold is +inf, which JSON cannot
# hold; 1 - _EDGE still calls (almost) nothing positive.
_EDGE = 1e-6
_BINARY_METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "ece")
_REGRESSION_METRICS = {"r2": "R²", "mae": "MAE", "rmse": "RMSE", "pearson": "Pearson r"}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted), one row/column per class even when absent."""
    return _sklearn.confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                       grade_order: Sequence[int] | None = None) -> dict[str, float]:
    """All classification metrics for integer labels `y_true` (N,) and class probabilities `probs` (N, C).

    Keys: n, accuracy, balanced_accuracy, auroc_macro, auprc_macro, f1_macro, sensitivity_macro,
    specificity_macro, kappa (unweighted Cohen's), [quadratic_kappa], mcc, ece (top-label expected
    calibration error, 10 bins), then auroc_<class>, auprc_<class>, sensitivity_<class> and
    specificity_<class> for every class name as given. Values are plain Python floats (NaN where
    undefined). For C=2, auroc_macro/auprc_macro are those of the positive class (index 1).

    `grade_order` (class indices from the lowest grade to the highest) marks the classes as ordered
    grades: quadratic_kappa is then added, weighting a disagreement by the squared grade distance —
    unweighted kappa treats "grade 0 called grade 4" like "grade 3 called grade 4".
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    _check_inputs(y_true, probs, names)
    labels = list(range(len(names)))
    y_pred = probs.argmax(axis=1)

    # zero_division=nan: a class absent from both truth and predictions is undefined, not 0, and
    # sklearn leaves it out of the macro average, as we do for AUROC/AUPRC.
    sensitivity = _sklearn.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    (tn, fp), _ = np.moveaxis(_sklearn.multilabel_confusion_matrix(y_true, y_pred, labels=labels), 0, -1)
    specificity = [_ratio(a, a + b) for a, b in zip(tn, fp, strict=True)]
    aurocs, auprcs = [], []
    for c, name in enumerate(names):
        auroc, auprc = _ranking_scores(y_true == c, probs[:, c], name)
        aurocs.append(auroc)
        auprcs.append(auprc)

    if len(names) == 2:
        # Binary: the AUROC/AUPRC of the positive class, the numbers papers report.
        auroc_macro, auprc_macro = aurocs[1], auprcs[1]
    else:
        auroc_macro, auprc_macro = _nanmean(aurocs), _nanmean(auprcs)

    out: dict[str, float] = {
        "n": float(len(y_true)),
        "accuracy": float(_sklearn.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _quiet(_sklearn.balanced_accuracy_score, y_true, y_pred),
        "auroc_macro": auroc_macro,
        "auprc_macro": auprc_macro,
        "f1_macro": float(_sklearn.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan)),
        "sensitivity_macro": _nanmean(sensitivity),
        "specificity_macro": _nanmean(specificity),
        "kappa": _quiet(_sklearn.cohen_kappa_score, y_true, y_pred, labels=labels),
    }
    if grade_order is not None:
        order = _check_grade_order(grade_order, len(names))
        # cohen_kappa_score weights by position in `labels`, so the grade order goes there.
        out["quadratic_kappa"] = _quiet(_sklearn.cohen_kappa_score, y_true, y_pred, labels=order,
                                        weights="quadratic")
    out["mcc"] = _quiet(_sklearn.matthews_corrcoef, y_true, y_pred)
    out["ece"] = expected_calibration_error((y_pred == y_true).astype(float), probs.max(axis=1))
    for prefix, values in (("auroc", aurocs), ("auprc", auprcs), ("sensitivity", sensitivity),
                           ("specificity", specificity)):
        out.update({f"{prefix}_{name}": float(v) for name, v in zip(names, values, strict=True)})
    return out


def grade_order_of(class_names: Sequence[str]) -> list[int] | None:
    """Class indices from the lowest to the highest grade when every class name carries a grade
    number ("0".."4", "DR0".."DR4", "grade_1".., "0_none", "1_mild"...) and the numbers are
    consecutive; None when the names do not look like grades."""
    found = [re.search(r"\d+", str(name)) for name in class_names]
    if len(found) < 3 or not all(found):  # two classes: quadratic and unweighted kappa agree
        return None
    numbers = [int(m.group()) for m in found if m]
    if sorted(numbers) != list(range(min(numbers), min(numbers) + len(numbers))):
        return None
    return [int(i) for i in np.argsort(numbers, kind="stable")]


def youden_thresholds(targets: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> list[float]:
    """Per label, the threshold maximising Youden's J = TPR − FPR on this (validation) set, from
    sklearn's ROC curve over the label's known rows, kept finite inside (0, 1). A label without
    both outcomes in the set gets 0.5, with a warning."""
    names = list(names)
    targets, probs = _check_table(targets, probs, names, "probs")
    _check_binary_targets(targets)
    chosen = []
    for i, name in enumerate(names):
        y, p = _known(targets, probs, i)
        missing = _missing_outcome(y == 1)
        if missing:
            warnings.warn(f"label {name!r} has {missing} in this set; its Youden threshold is undefined, "
                          "using 0.5", UserWarning, stacklevel=2)
            chosen.append(0.5)
            continue
        fpr, tpr, cut = _sklearn.roc_curve(y, p)
        # argmax takes the first maximum: of equally good thresholds, the highest (most specific).
        chosen.append(float(np.clip(cut[np.argmax(tpr - fpr)], _EDGE, 1 - _EDGE)))
    return chosen


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray, names: Sequence[str],
                       thresholds: Sequence[float] | float = 0.5) -> dict[str, float]:
    """Metrics for 0/1/NaN targets (N, L) and independent probabilities (N, L); a label is
    predicted positive when its probability is >= its threshold.

    Keys: n (rows), auroc_macro, auprc_macro, accuracy_macro, sensitivity_macro,
    specificity_macro, f1_macro, kappa_macro, ece_macro (means over the labels where defined),
    then <metric>_<label> for auroc, auprc, accuracy, sensitivity, specificity, f1, kappa, ece
    (expected calibration error, 10 bins), and threshold_<label>, n_<label> (rows with a known
    target), prevalence_<label>.
    """
    names = list(names)
    targets, probs = _check_table(targets, probs, names, "probs")
    _check_binary_targets(targets)
    cut = _thresholds(thresholds, len(names))
    per: dict[str, list[float]] = {key: [] for key in (*_BINARY_METRICS, "threshold", "n", "prevalence")}
    for i, name in enumerate(names):
        y, p = _known(targets, probs, i)
        y, pred = y.astype(np.int64), (p >= cut[i]).astype(np.int64)
        auroc, auprc = _ranking_scores(y == 1, p, name, kind="label")
        if len(y):
            values = {
                "accuracy": _sklearn.accuracy_score(y, pred),
                # zero_division=nan: no positives (or negatives) to find is undefined, not 0.
                "sensitivity": _sklearn.recall_score(y, pred, pos_label=1, zero_division=np.nan),
                "specificity": _sklearn.recall_score(y, pred, pos_label=0, zero_division=np.nan),
                "f1": _sklearn.f1_score(y, pred, zero_division=np.nan),
                "kappa": _quiet(_sklearn.cohen_kappa_score, y, pred, labels=[0, 1]),
                "ece": expected_calibration_error(y, p),
                "prevalence": np.mean(y),
            }
        else:
            values = dict.fromkeys(("accuracy", "sensitivity", "specificity", "f1", "kappa", "ece", "prevalence"),
                                   np.nan)
        values.update(auroc=auroc, auprc=auprc, threshold=cut[i], n=len(y))
        for key, value in values.items():
            per[key].append(float(value))

    out: dict[str, float] = {"n": float(len(targets))}
    out.update({f"{key}_macro": _nanmean(per[key]) for key in _BINARY_METRICS})
    for key, values in per.items():
        out.update({f"{key}_{name}": value for name, value in zip(names, values, strict=True)})
    return out


def multilabel_confusion(targets: np.ndarray, probs: np.ndarray,
                         thresholds: Sequence[float] | float = 0.5) -> np.ndarray:
    """Per label a 2x2 confusion matrix over its known rows, shape (L, 2, 2): rows true (negative,
    positive), columns predicted (probs >= threshold), laid out as sklearn's multilabel_confusion_matrix."""
    targets, probs = _check_table(targets, probs, None, "probs")
    _check_binary_targets(targets)
    cut = _thresholds(thresholds, probs.shape[1])
    cms = np.zeros((probs.shape[1], 2, 2), dtype=np.int64)
    for i in range(probs.shape[1]):
        y, p = _known(targets, probs, i)
        if len(y):  # sklearn refuses empty input; a label known nowhere has all-zero counts
            cms[i] = _sklearn.confusion_matrix(y.astype(np.int64), (p >= cut[i]).astype(np.int64), labels=[0, 1])
    return cms


def regression_metrics(targets: np.ndarray, preds: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Metrics for float targets (N, T) (NaN: unknown) and predictions (N, T) in the same units.

    Keys: n (rows), r2_macro, mae_macro, rmse_macro, pearson_macro (means over the targets where
    defined), then r2_<t>, mae_<t>, rmse_<t>, pearson_<t> and n_<t> (rows with a known value).
    A target with fewer than 2 known rows, or constant truth (R², r) or predictions (r), gets NaN
    for what is undefined, with a warning.
    """
    names = list(names)
    targets, preds = _check_table(targets, preds, names, "preds")
    if np.isinf(targets).any():
        raise ValueError("regression targets must be finite numbers or NaN (unknown)")
    per: dict[str, list[float]] = {key: [] for key in (*_REGRESSION_METRICS, "n")}
    scores: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "r2": _sklearn.r2_score,
        "mae": _sklearn.mean_absolute_error,
        "rmse": _sklearn.root_mean_squared_error,
        "pearson": lambda y, p: _scipy_stats.pearsonr(y, p).statistic,
    }
    for i, name in enumerate(names):
        y, p = _known(targets, preds, i)
        if len(y) == 0:
            reason, undefined = "no rows with a known value", set(_REGRESSION_METRICS)
        elif len(y) == 1:
            reason, undefined = "only 1 row with a known value", {"r2", "pearson"}
        elif np.ptp(y) == 0:
            reason, undefined = "constant true values", {"r2", "pearson"}
        elif np.ptp(p) == 0:
            reason, undefined = "constant predictions", {"pearson"}
        else:
            reason, undefined = None, set()
        if reason:
            labels = [label for key, label in _REGRESSION_METRICS.items() if key in undefined]
            listed = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
            warnings.warn(f"target {name!r} has {reason} in this set; its {listed} "
                          f"{'is' if len(labels) == 1 else 'are'} undefined (NaN)", UserWarning, stacklevel=2)
        for key, score in scores.items():
            per[key].append(float("nan") if key in undefined else float(score(y, p)))
        per["n"].append(float(len(y)))

    out: dict[str, float] = {"n": float(len(targets))}
    out.update({f"{key}_macro": _nanmean(per[key]) for key in _REGRESSION_METRICS})
    for key, values in per.items():
        out.update({f"{key}_{name}": value for name, value in zip(names, values, strict=True)})
    return out


def metrics_to_frame(metrics: dict[str, float],
                     ci: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """`metric`, `value`, `ci_low`, `ci_high`: one row per metric in dict order (for metrics CSVs);
    the CI cells are empty for metrics without an interval (counts, or no bootstrap)."""
    ci = ci or {}
    nan = (float("nan"), float("nan"))
    return pd.DataFrame({"metric": list(metrics), "value": list(metrics.values()),
                         "ci_low": [ci.get(k, nan)[0] for k in metrics],
                         "ci_high": [ci.get(k, nan)[1] for k in metrics]})


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    if probs.ndim != 2 or probs.shape[1] != len(names) or len(names) < 2:
        raise ValueError(f"probs must have shape (N, {len(names)}) for {len(names)} class names "
                         f"(at least 2); got {probs.shape}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique to name metrics; got {names}")
    if len(y_true) != len(probs):
        raise ValueError(f"{len(y_true)} labels but {len(probs)} rows of probabilities")
    if len(y_true) == 0:
        raise ValueError("no samples to compute metrics on")
    if y_true.min() < 0 or y_true.max() >= len(names):
        raise ValueError(f"labels must be class indices in [0, {len(names) - 1}]; "
                         f"got values from {y_true.min()} to {y_true.max()}")


def _check_grade_order(order: Sequence[int], num_classes: int) -> list[int]:
    order = [int(i) for i in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"grade order must list each of the {num_classes} class indices once; got {order}")
    return order


def _check_table(targets: np.ndarray, outputs: np.ndarray, names: Sequence[str] | None,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, outputs) as float arrays of one shape (N, L), L = len(names) when names are given."""
    targets, outputs = np.asarray(targets, dtype=np.float64), np.asarray(outputs, dtype=np.float64)
    width = len(names) if names is not None else (outputs.shape[-1] if outputs.ndim == 2 else 0)
    if outputs.ndim != 2 or outputs.shape[1] != width or width < 1:
        raise ValueError(f"{what} must have shape (N, {width}) for {width} names (at least 1); got {outputs.shape}")
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"names must be unique to name metrics; got {list(names)}")
    if targets.shape != outputs.shape:
        raise ValueError(f"targets have shape {targets.shape} but {what} {outputs.shape}")
    if len(targets) == 0:
        raise ValueError("no samples to compute metrics on")
    if not np.isfinite(outputs).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return targets, outputs


def _check_binary_targets(targets: np.ndarray) -> None:
    known = targets[~np.isnan(targets)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError(f"multi-label targets must be 0, 1 or NaN (unknown); got {np.unique(known).tolist()[:10]}")


def _thresholds(thresholds: Sequence[float] | float, width: int) -> np.ndarray:
    cut = np.asarray(thresholds, dtype=np.float64)
    if cut.ndim == 0:
        cut = np.full(width, float(cut))
    if cut.shape != (width,):
        raise ValueError(f"need one threshold or {width} (one per label); got {cut.shape[0]}")
    if not np.isfinite(cut).all():
        raise ValueError(f"thresholds must be finite; got {cut.tolist()}")
    return cut


def _known(targets: np.ndarray, outputs: np.ndarray, column: int) -> tuple[np.ndarray, np.ndarray]:
    """Column `column` of (targets, outputs) on the rows whose target is known (not NaN)."""
    known = ~np.isnan(targets[:, column])
    return targets[known, column], outputs[known, column]


def _missing_outcome(positive: np.ndarray) -> str | None:
    """Why a binary outcome's AUROC/AUPRC are undefined in this set, or None when they are defined."""
    if positive.size == 0:
        return "no rows with a known target"
    if positive.all():
        return "no negatives"
    if not positive.any():
        return "no positives"
    return None


def _ranking_scores(positive: np.ndarray, scores: np.ndarray, name: str, kind: str = "class") -> tuple[float, float]:
    """One-vs-rest (AUROC, AUPRC) of one class or label, NaN with a warning when only one outcome is present."""
    missing = _missing_outcome(positive)
    if missing:
        warnings.warn(f"{kind} {name!r} has {missing} in this set; its AUROC and AUPRC are undefined (NaN)",
                      UserWarning, stacklevel=3)  # the caller of multiclass_metrics / multilabel_metrics
        return float("nan"), float("nan")
    return float(_sklearn.roc_auc_score(positive, scores)), float(_sklearn.average_precision_score(positive, scores))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    defined = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _quiet(fn: Callable[..., float], *args: Any, **kwargs: Any) -> float:
    # On degenerate sets (one class, one sample) sklearn warns and returns its conventional value
    # (nan or 0); the value is the answer and the per-class warning already says why.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kwargs))
