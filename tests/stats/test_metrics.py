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
    mean_absolute_error,
    mean_squared_error,
    multilabel_confusion_matrix,
    r2_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from retinafm.stats.calibration import expected_calibration_error
from retinafm.stats.metrics import (
    confusion,
    grade_order_of,
    metrics_to_frame,
    multiclass_metrics,
    multilabel_confusion,
    multilabel_metrics,
    regression_metrics,
    youden_thresholds,
)

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
        assert value == (6.0 if key == "n" else 0.0 if key == "ece" else 1.0), key


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
                "sensitivity_macro", "specificity_macro", "kappa", "mcc", "ece"}
    expected |= {f"{metric}_{name}" for metric in ("auroc", "auprc", "sensitivity", "specificity")
                 for name in ("a b", "c-d", "e/f")}
    assert set(m) == expected
    decoded = json.loads(json.dumps(m))
    assert decoded.keys() == m.keys() and math.isnan(decoded["auroc_e/f"])


def test_metrics_to_frame():
    m = multiclass_metrics(*_data(40, 2), ["a", "b"])
    frame = metrics_to_frame(m)
    assert list(frame.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert frame["metric"].tolist() == list(m) and frame["value"].tolist() == list(m.values())
    assert frame["ci_low"].isna().all()


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


# ---------------------------------------------------------------- multi-label

LABELS = ["dme", "srf", "drusen"]


def _ml_data(n: int = 300, seed: int = 0, missing: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """0/1 targets with NaN (unknown) at rate `missing`, and informative sigmoid probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < [0.3, 0.15, 0.5]).astype(float)
    probs = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 2.0 * (y - 0.5))))
    y[rng.random(y.shape) < missing] = np.nan
    return y, probs


def test_multilabel_metrics_match_sklearn():
    y, p = _ml_data()
    cut = [0.3, 0.5, 0.65]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both outcomes present for every label: no warning expected
        m = multilabel_metrics(y, p, LABELS, cut)
    assert m["n"] == len(y)
    for i, name in enumerate(LABELS):
        known = ~np.isnan(y[:, i])
        t, s, pred = y[known, i].astype(int), p[known, i], (p[known, i] >= cut[i]).astype(int)
        (tn, fp), (fn, tp) = confusion_matrix(t, pred, labels=[0, 1])
        assert m[f"n_{name}"] == known.sum() < len(y)
        assert m[f"threshold_{name}"] == cut[i]
        assert m[f"prevalence_{name}"] == pytest.approx(t.mean())
        assert m[f"auroc_{name}"] == pytest.approx(roc_auc_score(t, s))
        assert m[f"auprc_{name}"] == pytest.approx(average_precision_score(t, s))
        assert m[f"accuracy_{name}"] == pytest.approx(accuracy_score(t, pred))
        assert m[f"sensitivity_{name}"] == pytest.approx(tp / (tp + fn))
        assert m[f"specificity_{name}"] == pytest.approx(tn / (tn + fp))
        assert m[f"f1_{name}"] == pytest.approx(f1_score(t, pred))
        assert m[f"kappa_{name}"] == pytest.approx(cohen_kappa_score(t, pred))
    for metric in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "kappa"):
        assert m[f"{metric}_macro"] == pytest.approx(np.mean([m[f"{metric}_{name}"] for name in LABELS]))


def test_multilabel_keys_order_and_types():
    y, p = _ml_data(80)
    m = multilabel_metrics(y, p, LABELS)
    macro = ["auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "ece"]
    assert list(m)[:9] == ["n"] + [f"{k}_macro" for k in macro]
    assert set(m) == {"n"} | {f"{k}_macro" for k in macro} | {
        f"{k}_{name}" for k in macro + ["threshold", "n", "prevalence"] for name in LABELS}
    assert all(type(v) is float for v in m.values())
    assert all(m[f"threshold_{name}"] == 0.5 for name in LABELS)


def test_unknown_targets_are_ignored():
    y, p = _ml_data(missing=0.0)
    hidden = np.arange(len(y)) % 3 == 0
    y[hidden, 0] = np.nan
    p_garbage = p.copy()
    p_garbage[hidden, 0] = 1 - p_garbage[hidden, 0]  # would change every metric if those rows counted
    m = multilabel_metrics(y, p_garbage, LABELS)
    m_known = multilabel_metrics(y[~hidden], p[~hidden], LABELS)
    assert m["n_dme"] == (~hidden).sum() and m["n_srf"] == len(y) and m["n"] == len(y)
    for metric in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "kappa", "prevalence"):
        assert m[f"{metric}_dme"] == pytest.approx(m_known[f"{metric}_dme"])
    assert m["auroc_srf"] != pytest.approx(m_known["auroc_srf"])  # the other labels keep all their rows


def test_label_without_positives_is_nan_with_a_warning_and_skipped_by_macro():
    y, p = _ml_data()
    y[y[:, 1] == 1, 1] = 0
    with pytest.warns(UserWarning, match="label 'srf' has no positives in this set; its AUROC and AUPRC "
                                         r"are undefined \(NaN\)") as record:
        m = multilabel_metrics(y, p, LABELS)
    assert len(record) == 1  # sklearn's own degenerate-set warnings are not passed on
    assert math.isnan(m["auroc_srf"]) and math.isnan(m["auprc_srf"]) and math.isnan(m["sensitivity_srf"])
    assert m["prevalence_srf"] == 0.0 and not math.isnan(m["specificity_srf"])
    assert m["auroc_macro"] == pytest.approx(np.mean([m["auroc_dme"], m["auroc_drusen"]]))
    assert m["sensitivity_macro"] == pytest.approx(np.mean([m["sensitivity_dme"], m["sensitivity_drusen"]]))


def test_label_never_known_does_not_crash():
    y, p = _ml_data(50)
    y[:, 2] = np.nan
    with pytest.warns(UserWarning, match="'drusen' has no rows with a known target"):
        m = multilabel_metrics(y, p, LABELS)
    assert m["n_drusen"] == 0
    assert all(math.isnan(m[f"{k}_drusen"]) for k in ("auroc", "accuracy", "sensitivity", "f1", "kappa", "prevalence"))
    assert not math.isnan(m["auroc_macro"])
    assert multilabel_confusion(y, p, 0.5)[2].tolist() == [[0, 0], [0, 0]]


def test_lower_threshold_raises_sensitivity_and_lowers_specificity():
    y, p = _ml_data()
    low, high = multilabel_metrics(y, p, LABELS, 0.2), multilabel_metrics(y, p, LABELS, 0.8)
    for name in LABELS:
        assert low[f"sensitivity_{name}"] > high[f"sensitivity_{name}"]
        assert low[f"specificity_{name}"] < high[f"specificity_{name}"]
        assert low[f"auroc_{name}"] == high[f"auroc_{name}"]  # ranking metrics ignore the threshold


def test_multilabel_confusion_matches_sklearn_and_masks_unknown():
    y, p = _ml_data(missing=0.0)
    cut = [0.4, 0.5, 0.6]
    expected = multilabel_confusion_matrix(y.astype(int), (p >= cut).astype(int))
    assert np.array_equal(multilabel_confusion(y, p, cut), expected)
    y[:40, 1] = np.nan
    cms = multilabel_confusion(y, p, cut)
    assert cms.shape == (3, 2, 2) and cms[1].sum() == len(y) - 40
    assert np.array_equal(cms[1], multilabel_confusion_matrix(y[40:].astype(int), (p[40:] >= cut).astype(int))[1])
    m = multilabel_metrics(y, p, LABELS, cut)
    (tn, fp), (fn, tp) = cms[1]
    assert m["sensitivity_srf"] == pytest.approx(tp / (tp + fn))
    assert m["specificity_srf"] == pytest.approx(tn / (tn + fp))


def test_youden_threshold_known_optimum():
    nan = np.nan
    # dme: J = 0.8 at 0.7 (4/5 positives, no negatives) beats 0.75 at 0.5; the unknown row would
    # otherwise be a negative at 0.95 that moves the optimum.
    # srf: perfectly separated, the lowest positive score (0.6) is the first with J = 1.
    # drusen: positives score lower than negatives, so no threshold beats "nothing positive" (+inf).
    y = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 1, 0],
                  [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [nan, 0, 0]])
    p = np.array([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.3, 0.2], [0.55, 0.3, 0.3], [0.5, 0.6, 0.8],
                  [0.7, 0.7, 0.8], [0.8, 0.8, 0.9], [0.9, 0.9, 0.9], [0.95, 0.9, 0.95], [0.95, 0.1, 0.9]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = youden_thresholds(y, p, LABELS)
    assert cut[0] == pytest.approx(0.7) and cut[1] == pytest.approx(0.6)
    assert all(math.isfinite(c) and 0 < c < 1 for c in cut) and cut[2] > 0.99
    m = multilabel_metrics(y, p, LABELS, cut)
    for i, name in enumerate(LABELS):  # the chosen threshold achieves the best J on the ROC curve
        known = ~np.isnan(y[:, i])
        fpr, tpr, _ = roc_curve(y[known, i], p[known, i])
        assert m[f"sensitivity_{name}"] + m[f"specificity_{name}"] - 1 == pytest.approx(max(tpr - fpr))


def test_youden_one_class_label_falls_back_with_a_warning():
    y, p = _ml_data()
    y[:, 2] = 1.0
    with pytest.warns(UserWarning, match="label 'drusen' has no negatives.*using 0.5"):
        cut = youden_thresholds(y, p, LABELS)
    assert cut[2] == 0.5 and cut[0] != 0.5


@pytest.mark.parametrize("y, p, names, thresholds, match", [
    (np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b"], 0.5, "shape"),
    (np.zeros((4, 2)), np.zeros(4), ["a", "b"], 0.5, "shape"),
    (np.zeros((3, 2)), np.zeros((4, 2)), ["a", "b"], 0.5, "targets have shape"),
    (np.full((2, 2), 2.0), np.zeros((2, 2)), ["a", "b"], 0.5, "0, 1 or NaN"),
    (np.zeros((2, 2)), np.zeros((2, 2)), ["a", "b"], [0.5, 0.5, 0.5], "one per label"),
    (np.zeros((2, 2)), np.zeros((2, 2)), ["a", "a"], 0.5, "unique"),
    (np.zeros((2, 2)), np.full((2, 2), np.nan), ["a", "b"], 0.5, "NaN or infinite"),
    (np.zeros((0, 2)), np.zeros((0, 2)), ["a", "b"], 0.5, "no samples"),
])
def test_multilabel_unusable_inputs_are_clear_errors(y, p, names, thresholds, match):
    with pytest.raises(ValueError, match=match):
        multilabel_metrics(y, p, names, thresholds)


# ---------------------------------------------------------------- regression

TARGETS = ["age", "axial length"]


def _reg_data(n: int = 200, seed: int = 0, missing: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.normal(60, 12, n), rng.normal(23.5, 1.0, n)])
    preds = y + rng.normal(0, [6.0, 0.6], (n, 2)) + [2.0, -0.1]
    y[rng.random(y.shape) < missing] = np.nan
    return y, preds


def test_regression_metrics_match_sklearn():
    y, p = _reg_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics(y, p, TARGETS)
    assert list(m)[:5] == ["n", "r2_macro", "mae_macro", "rmse_macro", "pearson_macro"]
    assert set(m) == set(list(m)[:5]) | {f"{k}_{t}" for k in ("r2", "mae", "rmse", "pearson", "n") for t in TARGETS}
    assert all(type(v) is float for v in m.values()) and m["n"] == len(y)
    for i, name in enumerate(TARGETS):
        known = ~np.isnan(y[:, i])
        t, s = y[known, i], p[known, i]
        assert m[f"n_{name}"] == known.sum() < len(y)
        assert m[f"r2_{name}"] == pytest.approx(r2_score(t, s))
        assert m[f"mae_{name}"] == pytest.approx(mean_absolute_error(t, s))
        assert m[f"rmse_{name}"] == pytest.approx(math.sqrt(mean_squared_error(t, s)))
        assert m[f"pearson_{name}"] == pytest.approx(np.corrcoef(t, s)[0, 1])
    for metric in ("r2", "mae", "rmse", "pearson"):
        assert m[f"{metric}_macro"] == pytest.approx(np.mean([m[f"{metric}_{t}"] for t in TARGETS]))


def test_regression_unknown_targets_are_ignored():
    y, p = _reg_data(missing=0.0)
    y[:50, 0] = np.nan
    p[:50, 0] = 1e6  # would dominate MAE/RMSE if counted
    m = regression_metrics(y, p, TARGETS)
    assert m["n_age"] == len(y) - 50
    assert m["mae_age"] == pytest.approx(mean_absolute_error(y[50:, 0], p[50:, 0])) and m["mae_age"] < 20


@pytest.mark.parametrize("column, prediction, match, undefined", [
    ([np.nan, np.nan, 5.0, np.nan], [1.0, 2.0, 4.0, 3.0], "only 1 row.*R² and Pearson r are undefined",
     {"r2", "pearson"}),
    ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 4.0, 3.0], "constant true values.*R² and Pearson r are", {"r2", "pearson"}),
    ([1.0, 2.0, 3.0, 4.0], [3.0, 3.0, 3.0, 3.0], "constant predictions.*Pearson r is undefined", {"pearson"}),
    ([np.nan] * 4, [1.0, 2.0, 4.0, 3.0], "no rows.*R², MAE, RMSE and Pearson r", {"r2", "mae", "rmse", "pearson"}),
])
def test_regression_degenerate_target_is_nan_with_a_warning(column, prediction, match, undefined):
    y = np.column_stack([column, [1.0, 2.0, 3.0, 4.0]])
    p = np.column_stack([prediction, [1.5, 2.0, 2.5, 4.5]])
    with pytest.warns(UserWarning, match="target 'age' has " + match) as record:
        m = regression_metrics(y, p, TARGETS)
    assert len(record) == 1
    for metric in ("r2", "mae", "rmse", "pearson"):
        assert math.isnan(m[f"{metric}_age"]) == (metric in undefined), metric
        # The macro average skips an undefined target.
        defined = [m[f"{metric}_{t}"] for t in TARGETS if not math.isnan(m[f"{metric}_{t}"])]
        assert len(defined) == (1 if metric in undefined else 2)
        assert m[f"{metric}_macro"] == pytest.approx(np.mean(defined))


@pytest.mark.parametrize("y, p, match", [
    (np.zeros((3, 2)), np.zeros((3, 1)), "shape"),
    (np.zeros((2, 2)), np.zeros((3, 2)), "targets have shape"),
    (np.array([[np.inf, 0.0]]), np.zeros((1, 2)), "finite"),
    (np.zeros((1, 2)), np.array([[np.nan, 0.0]]), "NaN or infinite"),
])
def test_regression_unusable_inputs_are_clear_errors(y, p, match):
    with pytest.raises(ValueError, match=match):
        regression_metrics(y, p, TARGETS)


def test_grade_order_of_numbered_class_names():
    assert grade_order_of(["0", "1", "2", "3", "4"]) == [0, 1, 2, 3, 4]
    assert grade_order_of(["DR0", "DR1", "DR2"]) == [0, 1, 2]
    assert grade_order_of(["1_mild", "0_none", "2_severe"]) == [1, 0, 2]  # lowest grade first
    # Sorted as text, grade 10 comes before grade 2; the order follows the numbers.
    names = [f"grade_{i}" for i in sorted(range(11), key=str)]
    assert [names[i] for i in grade_order_of(names)] == [f"grade_{i}" for i in range(11)]
    assert grade_order_of(["normal", "glaucoma", "dr"]) is None
    assert grade_order_of(["0", "1"]) is None  # binary: quadratic kappa is the unweighted one
    assert grade_order_of(["grade_1", "grade_3", "grade_4"]) is None  # not consecutive


def test_quadratic_kappa_follows_the_grade_order_not_the_class_index():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 300)
    predicted = np.clip(grades + rng.integers(-1, 2, 300), 0, 4)
    names = ["grade_0", "grade_1", "grade_10", "grade_2", "grade_3"]  # class index order of sorted text
    grade_of_class = [0, 1, 4, 2, 3]  # "grade_10" is the fifth grade here
    class_of_grade = np.argsort(grade_of_class)
    y, pred = class_of_grade[grades], class_of_grade[predicted]
    probs = np.eye(5)[pred] * 0.8 + 0.04
    ordered = multiclass_metrics(y, probs, names, grade_order=class_of_grade.tolist())
    assert ordered["quadratic_kappa"] == pytest.approx(cohen_kappa_score(grades, predicted, weights="quadratic"))
    assert ordered["kappa"] == pytest.approx(cohen_kappa_score(grades, predicted))
    assert ordered["quadratic_kappa"] > ordered["kappa"]  # near misses count as partly right
    assert "quadratic_kappa" not in multiclass_metrics(y, probs, names)
    with pytest.raises(ValueError, match="grade order"):
        multiclass_metrics(y, probs, names, grade_order=[0, 1, 2])


def test_expected_calibration_error_is_reported():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    m = multiclass_metrics(y, probs, ["a", "b", "c"])
    correct = (probs.argmax(1) == y).astype(float)
    assert m["ece"] == pytest.approx(expected_calibration_error(correct, probs.max(1)))
    targets = rng.integers(0, 2, (200, 2)).astype(float)
    targets[0, 1] = np.nan
    p = rng.random((200, 2))
    ml = multilabel_metrics(targets, p, ["x", "y"])
    assert ml["ece_y"] == pytest.approx(expected_calibration_error(targets[1:, 1], p[1:, 1]))
    assert ml["ece_macro"] == pytest.approx((ml["ece_x"] + ml["ece_y"]) / 2)


def test_metrics_frame_puts_intervals_beside_values():
    frame = metrics_to_frame({"n": 10.0, "auroc_macro": 0.9}, {"auroc_macro": (0.8, 0.95)})
    assert list(frame.columns) == ["metric", "value", "ci_low", "ci_high"]
    assert frame.iloc[1].tolist() == ["auroc_macro", 0.9, 0.8, 0.95]
    assert np.isnan(frame.iloc[0]["ci_low"])
