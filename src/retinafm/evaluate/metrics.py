"""Classification metrics as pure functions on arrays, computed by scikit-learn.

Per-class metrics are one-vs-rest. A class with no positives (or no negatives) in the evaluated
set has an undefined AUROC/AUPRC (and possibly sensitivity/specificity): it is reported as NaN,
with a warning for the AUROC/AUPRC, and macro averages are taken over the classes where the
metric is defined.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted), one row/column per class even when absent."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """All classification metrics for integer labels `y_true` (N,) and class probabilities `probs` (N, C).

    Keys: n, accuracy, balanced_accuracy, auroc_macro, auprc_macro, f1_macro, sensitivity_macro,
    specificity_macro, kappa, mcc, then auroc_<class>, auprc_<class>, sensitivity_<class> and
    specificity_<class> for every class name as given. Values are plain Python floats (NaN where
    undefined). For C=2, auroc_macro/auprc_macro are those of the positive class (index 1).
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    _check_inputs(y_true, probs, names)
    labels = list(range(len(names)))
    y_pred = probs.argmax(axis=1)

    # zero_division=nan: a class absent from both truth and predictions is undefined, not 0, and
    # sklearn leaves it out of the macro average, as we do for AUROC/AUPRC.
    sensitivity = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    (tn, fp), _ = np.moveaxis(multilabel_confusion_matrix(y_true, y_pred, labels=labels), 0, -1)
    specificity = [_ratio(a, a + b) for a, b in zip(tn, fp)]
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
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _quiet(lambda: balanced_accuracy_score(y_true, y_pred)),
        "auroc_macro": auroc_macro,
        "auprc_macro": auprc_macro,
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=np.nan)),
        "sensitivity_macro": _nanmean(sensitivity),
        "specificity_macro": _nanmean(specificity),
        "kappa": _quiet(lambda: cohen_kappa_score(y_true, y_pred, labels=labels)),
        "mcc": _quiet(lambda: matthews_corrcoef(y_true, y_pred)),
    }
    for prefix, values in (("auroc", aurocs), ("auprc", auprcs), ("sensitivity", sensitivity),
                           ("specificity", specificity)):
        out.update({f"{prefix}_{name}": float(v) for name, v in zip(names, values)})
    return out


def metrics_to_frame(metrics: dict[str, float]) -> pd.DataFrame:
    """Two columns, `metric` and `value`, one row per metric in dict order (for metrics CSVs)."""
    return pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})


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


def _ranking_scores(positive: np.ndarray, scores: np.ndarray, name: str) -> tuple[float, float]:
    """One-vs-rest (AUROC, AUPRC) of one class, NaN with a warning when only one outcome is present."""
    if positive.all() or not positive.any():
        missing = "no negatives" if positive.all() else "no positives"
        warnings.warn(f"class {name!r} has {missing} in this set; its AUROC and AUPRC are undefined (NaN)",
                      UserWarning, stacklevel=3)  # the caller of multiclass_metrics
        return float("nan"), float("nan")
    return float(roc_auc_score(positive, scores)), float(average_precision_score(positive, scores))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    defined = [float(v) for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _quiet(fn: Callable[[], float]) -> float:
    # On degenerate sets (one class, one sample) sklearn warns and returns its conventional value
    # (nan or 0); the value is the answer and the per-class warning already says why.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn())
