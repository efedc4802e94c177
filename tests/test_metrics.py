"""Every reported metric equals scikit-learn's (or a direct computation) on fixed arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    matthews_corrcoef,
    recall_score,
    roc_auc_score,
)

from retinafm.evaluate.metrics import confusion, metrics_to_frame, multiclass_metrics


def _data(n: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_four_class_metrics_match_sklearn():
    y, p = _data(200, 4)
    names = ["a", "b", "c", "d"]
    m = multiclass_metrics(y, p, names)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["sensitivity_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["n"] == 200
    for c, name in enumerate(names):
        assert m[f"auroc_{name}"] == pytest.approx(roc_auc_score(y == c, p[:, c]))
        assert m[f"auprc_{name}"] == pytest.approx(average_precision_score(y == c, p[:, c]))
        tp = np.sum((pred == c) & (y == c))
        tn = np.sum((pred != c) & (y != c))
        assert m[f"sensitivity_{name}"] == pytest.approx(tp / np.sum(y == c))
        assert m[f"specificity_{name}"] == pytest.approx(tn / np.sum(y != c))
    assert m["auprc_macro"] == pytest.approx(np.mean([m[f"auprc_{n}"] for n in names]))
    assert m["specificity_macro"] == pytest.approx(np.mean([m[f"specificity_{n}"] for n in names]))


def test_binary_reports_the_positive_class():
    y, p = _data(120, 2, seed=1)
    m = multiclass_metrics(y, p, ["healthy", "referable"])
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["auprc_macro"] == pytest.approx(average_precision_score(y, p[:, 1]))
    assert m["sensitivity_referable"] == pytest.approx(recall_score(y, p.argmax(1)))


def test_perfect_predictions():
    y = np.array([0, 1, 2, 2, 1, 0])
    m = multiclass_metrics(y, np.eye(3)[y], ["x", "y", "z"])
    assert all(m[k] == 1.0 for k in ("accuracy", "auroc_macro", "auprc_macro", "kappa", "mcc", "f1_macro"))


def test_absent_class_is_nan_with_a_warning_not_a_crash():
    y, p = _data(60, 3, seed=2)
    y[y == 2] = 0
    with pytest.warns(UserWarning, match="'c' has no positives"):
        m = multiclass_metrics(y, p, ["a", "b", "c"])
    assert np.isnan(m["auroc_c"]) and np.isnan(m["sensitivity_c"])
    assert m["auroc_macro"] == pytest.approx(np.mean([m["auroc_a"], m["auroc_b"]]))
    with pytest.warns(UserWarning):
        single = multiclass_metrics(np.array([1]), np.array([[0.2, 0.8]]), ["a", "b"])
    assert single["accuracy"] == 1.0 and np.isnan(single["auroc_macro"])


def test_values_are_plain_json_floats_and_frame():
    y, p = _data(50, 3)
    m = multiclass_metrics(y, p, ["a b", "c", "d"])
    assert all(type(v) is float for v in m.values())
    assert "auroc_a b" in m
    json.loads(json.dumps(m))
    frame = metrics_to_frame(m)
    assert list(frame.columns) == ["metric", "value"] and len(frame) == len(m)


def test_confusion_keeps_absent_classes():
    cm = confusion(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
