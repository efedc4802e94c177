"""Classification metrics as pure functions on arrays, computed by scikit-learn.

One-vs-rest per class; a class with no positives (or no negatives) in the evaluated set has an
undefined AUROC/AUPRC, reported as NaN with a warning, and macro averages skip it.
"""
from __future__ import annotations

import warnings
from typing import Sequence

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
    recall_score,
    roc_auc_score,
)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class, for all classes even when absent."""
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUROC/AUPRC (macro + per class), F1, sensitivity,
    specificity (macro + per class), Cohen's kappa, MCC and n, as plain floats."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    y_pred = probs.argmax(axis=1)
    cm = confusion(y_true, y_pred, n_classes)
    out: dict[str, float] = {
        "n": float(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _quiet(lambda: balanced_accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "sensitivity_macro": float(recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "kappa": _quiet(lambda: cohen_kappa_score(y_true, y_pred, labels=labels)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
    }
    aurocs, auprcs, specs = [], [], []
    for c, name in enumerate(class_names):
        positive = y_true == c
        tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
        fp = cm[:, c].sum() - tp
        tn = cm.sum() - tp - fn - fp
        out[f"sensitivity_{name}"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out[f"specificity_{name}"] = float(tn / (tn + fp)) if tn + fp else float("nan")
        specs.append(out[f"specificity_{name}"])
        if positive.all() or not positive.any():
            warnings.warn(f"class {name!r} has {'no negatives' if positive.all() else 'no positives'} in this set; "
                          "its AUROC and AUPRC are undefined (NaN)", UserWarning, stacklevel=2)
            auroc = auprc = float("nan")
        else:
            auroc = float(roc_auc_score(positive, probs[:, c]))
            auprc = float(average_precision_score(positive, probs[:, c]))
        out[f"auroc_{name}"], out[f"auprc_{name}"] = auroc, auprc
        aurocs.append(auroc)
        auprcs.append(auprc)
    if n_classes == 2:
        # Binary: the AUROC of the positive class (class 1), the number papers report.
        out["auroc_macro"], out["auprc_macro"] = aurocs[1], auprcs[1]
    else:
        out["auroc_macro"], out["auprc_macro"] = _nanmean(aurocs), _nanmean(auprcs)
    out["specificity_macro"] = _nanmean(specs)
    return out


def _quiet(fn) -> float:
    # kappa/balanced accuracy warn and return nan on degenerate sets; the nan is the answer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn())
    return value


def metrics_to_frame(metrics: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})
