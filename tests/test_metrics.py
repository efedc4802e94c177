"""Every reported metric equals scikit-learn's (or a hand computation from the confusion matrix)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
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

from retinafm.evaluate.metrics import confusion, metrics_to_frame, multiclass_metrics

NAMES = {2: ["healthy", "referable DR"], 4: ["no DR", "mild", "moderate", "severe/PDR"]}


def _data(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("c", [2, 4])
def test_metrics_match_sklearn(c):
    y, p = _data(200, c)
    names = NAMES[c]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class is present: no warning expected
        m = multiclass_metrics(y, p, names)
    pred = p.argmax(1)
    if c == 2:
        assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p[:, 1]))
        assert m["auprc_macro"] == pytest.approx(average_precision_score(y, p[:, 1]))
    else:
        assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
        assert m["auprc_macro"] == pytest.approx(average_precision_score(np.eye(c)[y], p, average="macro"))
    assert m["n"] == 200
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["sensitivity_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    for k, name in enumerate(names):
        assert m[f"auroc_{name}"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
        assert m[f"auprc_{name}"] == pytest.approx(average_precision_score(y == k, p[:, k]))


@pytest.mark.parametrize("c", [2, 4])
def test_sensitivity_specificity_by_hand(c):
    y, p = _data(150, c, seed=3)
    names = NAMES[c]
    m = multiclass_metrics(y, p, names)
    cm = confusion_matrix(y, p.argmax(1))
    total = cm.sum()
    sens, spec = [], []
    for k, name in enumerate(names):
        tp, fn, fp = cm[k, k], cm[k].sum() - cm[k, k], cm[:, k].sum() - cm[k, k]
        tn = total - tp - fn - fp
        sens.append(tp / (tp + fn))
        spec.append(tn / (tn + fp))
        assert m[f"sensitivity_{name}"] == pytest.approx(sens[-1])
        assert m[f"specificity_{name}"] == pytest.approx(spec[-1])
    assert m["sensitivity_macro"] == pytest.approx(np.mean(sens))
    assert m["specificity_macro"] == pytest.approx(np.mean(spec))


@pytest.mark.parametrize("c", [2, 3])
def test_perfect_predictions(c):
    y = np.arange(6) % c
    m = multiclass_metrics(y, np.eye(c)[y], [f"k{i}" for i in range(c)])
    for key, value in m.items():
        assert value == (6.0 if key == "n" else 1.0), key


def test_absent_class_is_nan_with_a_warning_not_a_crash():
    y, p = _data(60, 3, seed=2)
    y[y == 2] = 0
    with pytest.warns(UserWarning, match="'c' has no positives") as record:
        m = multiclass_metrics(y, p, ["a", "b", "c"])
    assert len(record) == 1  # sklearn's own degenerate-set warnings are not passed on
    assert math.isnan(m["auroc_c"]) and math.isnan(m["auprc_c"]) and math.isnan(m["sensitivity_c"])
    assert not math.isnan(m["specificity_c"])
    assert m["auroc_macro"] == pytest.approx(np.mean([m["auroc_a"], m["auroc_b"]]))
    assert m["auprc_macro"] == pytest.approx(np.mean([m["auprc_a"], m["auprc_b"]]))
    # Macro sensitivity skips the undefined class too, so it agrees with balanced accuracy.
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(y, p.argmax(1))
    assert m["sensitivity_macro"] == pytest.approx(expected)


def test_binary_without_positives():
    y = np.zeros(5, dtype=int)
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    with pytest.warns(UserWarning) as record:
        m = multiclass_metrics(y, p, NAMES[2])
    assert sorted(str(w.message).split(";")[0] for w in record) == [
        "class 'healthy' has no negatives in this set", "class 'referable DR' has no positives in this set"]
    assert math.isnan(m["auroc_macro"]) and math.isnan(m["auprc_macro"])
    assert m["accuracy"] == pytest.approx(0.8) and m["specificity_referable DR"] == pytest.approx(0.8)


def test_single_sample_does_not_crash():
    with pytest.warns(UserWarning, match="has no") as record:
        m = multiclass_metrics(np.array([1]), np.array([[0.2, 0.8]]), ["a", "b"])
    assert all("class" in str(w.message) for w in record)
    assert m["accuracy"] == 1.0 and m["n"] == 1.0
    assert math.isnan(m["auroc_macro"]) and math.isnan(m["auroc_a"]) and math.isnan(m["auroc_b"])


def test_values_are_plain_json_floats_and_names_kept():
    y, p = _data(50, 3)
    y[y == 2] = 1  # one NaN metric must still serialise
    with pytest.warns(UserWarning):
        m = multiclass_metrics(y, p, ["a b", "c-d", "e/f"])
    assert all(type(v) is float for v in m.values())
    expected = {"n", "accuracy", "balanced_accuracy", "auroc_macro", "auprc_macro", "f1_macro",
                "sensitivity_macro", "specificity_macro", "kappa", "mcc"}
    expected |= {f"{metric}_{name}" for metric in ("auroc", "auprc", "sensitivity", "specificity")
                 for name in ("a b", "c-d", "e/f")}
    assert set(m) == expected
    decoded = json.loads(json.dumps(m))
    assert decoded.keys() == m.keys() and math.isnan(decoded["auroc_e/f"])


def test_metrics_to_frame():
    m = multiclass_metrics(*_data(40, 2), ["a", "b"])
    frame = metrics_to_frame(m)
    assert list(frame.columns) == ["metric", "value"]
    assert frame["metric"].tolist() == list(m) and frame["value"].tolist() == list(m.values())


def test_confusion_keeps_absent_classes():
    cm = confusion(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("y, p, names, match", [
    (np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"], "shape"),
    (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"], "labels but"),
    (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], "class indices"),
    (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"], "unique"),
    (np.zeros(0, dtype=int), np.zeros((0, 2)), ["a", "b"], "no samples"),
])
def test_unusable_inputs_are_clear_errors(y, p, names, match):
    with pytest.raises(ValueError, match=match):
        multiclass_metrics(y, p, names)
