"""Which images report.html explains with heatmaps, per task type: the most confident errors first,
then a seeded sample of correct cases; unknown truths never chosen; CSVs read as text or as written."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from retinafm.tasks import TASKS, ExplainCase, MulticlassTask, MultilabelTask, RegressionTask
from retinafm.tasks.base import TaskBase, sample_in_order


def _as_read(frame: pd.DataFrame, tmp_path) -> pd.DataFrame:
    """The frame as report.py reads predictions: every cell text, empty cells empty strings."""
    from retinafm.files.inputs import read_table

    path = tmp_path / "predictions_test.csv"
    frame.to_csv(path, index=False)
    return read_table(path, what="report input", text=True, na_values=())


# --- multiclass ---------------------------------------------------------------------------------

CLASSES = ["normal", "dr", "glaucoma"]


def _multiclass_frame() -> pd.DataFrame:
    rows = [  # path, label, prediction, p(normal), p(dr), p(glaucoma)
        ("a.png", "normal", "normal", 0.9, 0.05, 0.05),
        ("b.png", "dr", "normal", 0.6, 0.3, 0.1),  # wrong, p(predicted) 0.6
        ("c.png", "glaucoma", "dr", 0.05, 0.9, 0.05),  # wrong, 0.9: the most confident error
        ("d.png", "", "glaucoma", 0.0, 0.01, 0.99),  # unknown truth: never chosen
        ("e.png", "dr", "dr", 0.1, 0.8, 0.1),
        ("f.png", "glaucoma", "glaucoma", 0.1, 0.1, 0.8),
        ("g.png", "normal", "glaucoma", 0.3, 0.0, 0.7),  # wrong, 0.7
        ("h.png", "normal", "normal", 0.7, 0.2, 0.1),
    ]
    frame = pd.DataFrame({"path": [r[0] for r in rows], "prediction": [r[2] for r in rows],
                          "label": [r[1] or None for r in rows]})
    for k, name in enumerate(CLASSES):
        frame[f"prob_{name}"] = [r[3 + k] for r in rows]
    return frame


@pytest.mark.parametrize("as_text", [False, True])
def test_multiclass_errors_most_confident_first_then_a_sample_of_correct(as_text, tmp_path):
    frame = _multiclass_frame()
    frame = _as_read(frame, tmp_path) if as_text else frame
    cases = MulticlassTask.explain_cases(frame, CLASSES, {}, n_errors=2, n_correct=2, seed=0)
    assert cases[:2] == [("c.png", "dr", "error"), ("g.png", "glaucoma", "error")]  # the predicted class
    correct = cases[2:]
    assert len(correct) == 2 and all(c.case == "correct" for c in correct)
    truth = dict(zip(frame["path"], frame["prediction"], strict=True))
    assert all(c.path in {"a.png", "e.png", "f.png", "h.png"} and c.target == truth[c.path] for c in correct)
    assert all(isinstance(c, ExplainCase) for c in cases)
    # Deterministic for a seed; all the errors and correct cases when asked for more than there are.
    assert MulticlassTask.explain_cases(frame, CLASSES, {}, 2, 2, 0) == cases
    everything = MulticlassTask.explain_cases(frame, CLASSES, {}, 10, 10, 0)
    assert [c.path for c in everything] == ["c.png", "g.png", "b.png", "a.png", "e.png", "f.png", "h.png"]
    assert "d.png" not in {c.path for c in everything}


def test_multiclass_seed_changes_the_sample_only():
    frame = pd.concat([_multiclass_frame()] * 20, ignore_index=True)
    frame["path"] = [f"{i:03d}.png" for i in range(len(frame))]
    samples = {tuple(MulticlassTask.explain_cases(frame, CLASSES, {}, 3, 5, seed)) for seed in range(5)}
    assert len(samples) > 1
    assert len({s[:3] for s in samples}) == 1  # the errors do not depend on the seed


def test_multiclass_no_errors_no_cases_and_unknown_classes():
    frame = _multiclass_frame()
    frame.loc[6, "prediction"] = "cataract"  # not one of the model's classes: nothing to explain
    cases = MulticlassTask.explain_cases(frame, CLASSES, {}, n_errors=5, n_correct=0, seed=0)
    assert [c.path for c in cases] == ["c.png", "b.png"]
    assert MulticlassTask.explain_cases(frame, CLASSES, {}, n_errors=0, n_correct=0, seed=0) == []


# --- multi-label --------------------------------------------------------------------------------

LABELS = ["cup", "haem"]


def _multilabel_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "prediction": ["cup", "", "cup;haem", "haem", ""],
        "true_cup": [1, 1, 0, None, 0],
        "true_haem": [0, 1, 1, 1, None],
        "prob_cup": [0.8, 0.3, 0.95, 0.99, 0.1],
        "prob_haem": [0.2, 0.4, 0.7, 0.9, 0.99],
    })


@pytest.mark.parametrize("as_text", [False, True])
def test_multilabel_errors_furthest_from_the_threshold_first(as_text, tmp_path):
    frame = _multilabel_frame()
    frame = _as_read(frame, tmp_path) if as_text else frame
    metrics = {"task": {"state": {"thresholds": [0.5, 0.6]}}}  # the saved per-label thresholds
    cases = MultilabelTask.explain_cases(frame, LABELS, metrics, n_errors=5, n_correct=5, seed=0)
    errors = [c for c in cases if c.case == "error"]
    # c/cup: 0.95 against 0.5; b/cup: 0.3 against 0.5; b/haem: 0.4 against 0.6.
    assert errors == [("c.png", "cup", "error"), ("b.png", "cup", "error"), ("b.png", "haem", "error")]
    correct = [c for c in cases if c.case == "correct"]
    # true positives: a/cup, c/haem (0.7 >= 0.6), d/haem; d/cup and e/haem have no truth.
    assert correct == [("a.png", "cup", "correct"), ("c.png", "haem", "correct"), ("d.png", "haem", "correct")]


def test_multilabel_falls_back_to_correct_negatives_and_default_threshold():
    frame = pd.DataFrame({"path": ["a.png", "b.png"], "true_cup": [0, 0], "prob_cup": [0.1, 0.7]})
    cases = MultilabelTask.explain_cases(frame, ["cup"], {}, n_errors=3, n_correct=3, seed=1)
    assert cases == [("b.png", "cup", "error"), ("a.png", "cup", "correct")]  # no positives: a true negative


# --- regression ---------------------------------------------------------------------------------


def _regression_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "true_age": [50.0, 60.0, None, 70.0, 40.0],
        "age": [52.0, 45.0, 99.0, 70.5, 41.0],
    })


@pytest.mark.parametrize("as_text", [False, True])
def test_regression_largest_errors_and_smallest(as_text, tmp_path):
    frame = _regression_frame()
    frame = _as_read(frame, tmp_path) if as_text else frame
    cases = RegressionTask.explain_cases(frame, ["age"], {}, n_errors=2, n_correct=2, seed=0)
    assert cases == [("b.png", "age", "error"), ("a.png", "age", "error"),
                     ("d.png", "age", "correct"), ("e.png", "age", "correct")]
    # c.png has no truth; with few images an error is never also a correct case.
    everything = RegressionTask.explain_cases(frame, ["age"], {}, n_errors=3, n_correct=3, seed=0)
    assert [c.path for c in everything] == ["b.png", "a.png", "e.png", "d.png"]


def test_regression_several_targets_ranked_in_standard_deviations():
    frame = pd.DataFrame({"path": ["a", "b", "c"], "true_age": [40.0, 50.0, 60.0], "age": [45.0, 50.0, 60.0],
                          "true_iop": [10.0, 20.0, 30.0], "iop": [10.0, 21.0, 30.0]})
    cases = RegressionTask.explain_cases(frame, ["age", "iop"], {}, n_errors=1, n_correct=1, seed=0)
    # age: 5 / 8.16 SD against iop's 1 / 8.16 SD. The smallest: the exact ones, in CSV then target order.
    assert cases == [("a", "age", "error"), ("a", "iop", "correct")]


def test_every_task_type_answers_and_the_base_has_no_cases():
    assert TaskBase.explain_cases(_multiclass_frame(), CLASSES, {}, 3, 3, 0) == []
    assert set(TASKS) == {"multiclass", "multilabel", "regression"}
    for name in TASKS:
        assert TASKS[name].explain_cases is not TaskBase.explain_cases


def test_sample_in_order():
    assert sample_in_order(3, 5, 0).tolist() == [0, 1, 2]
    picked = sample_in_order(100, 10, 7)
    assert len(set(picked.tolist())) == 10 and (np.diff(picked) > 0).all()
    assert picked.tolist() == sample_in_order(100, 10, 7).tolist()
    assert sample_in_order(10, 0, 0).tolist() == []
