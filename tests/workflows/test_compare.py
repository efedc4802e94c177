"""`compare`: paired differences with bootstrap CIs, DeLong per ROC curve, Wilcoxon across tasks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from sklearn.metrics import r2_score, roc_auc_score

from retinafm.files import write_csv, write_json
from retinafm.stats.delong import delong_test
from retinafm.tasks import make_task
from retinafm.workflows.compare import CompareError, compare_runs, load_run

CLASSES = ["healthy", "referable"]


def _write_run(folder: Path, task, targets, outputs, paths=None, patients=None) -> Path:
    """A run folder as `evaluate` leaves it: predictions_test.csv and metrics_test.json."""
    paths = paths if paths is not None else [f"img_{i:04d}.png" for i in range(len(outputs))]
    frame = task.prediction_frame(paths, outputs, targets)
    if patients is not None:
        frame.insert(1, "patient_id", patients)
    write_csv(folder / "predictions_test.csv", frame)
    write_json(folder / "metrics_test.json", {"split": "test", **task.metrics(targets, outputs),
                                              "task": {"name": task.name, "outputs": list(task.output_names),
                                                       "state": task.state()}})
    return folder


def _binary_scores(n: int, seed: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    score = 1 / (1 + np.exp(-(separation * (y - 0.5) + rng.normal(0, 1, n))))
    return y, np.stack([1 - score, score], axis=1)


@pytest.fixture
def binary_runs(tmp_path):
    task = make_task("multiclass", CLASSES)
    y, weak = _binary_scores(200, 0, 0.8)
    _, strong = _binary_scores(200, 1, 3.0)
    return (_write_run(tmp_path / "retfound", task, y, weak), _write_run(tmp_path / "ours", task, y, strong), y,
            weak, strong)


@pytest.mark.slow
def test_better_model_has_a_positive_difference_with_ci_above_zero(binary_runs, tmp_path):
    weak_run, strong_run, y, weak, strong = binary_runs
    result = compare_runs([weak_run, strong_run], tmp_path / "cmp", bootstrap=300)
    headline, curve = result.rows
    assert (headline.metric, headline.test, headline.reference, headline.model) == (
        "auroc_macro", "paired bootstrap", "retfound", "ours")
    assert headline.reference_value == pytest.approx(roc_auc_score(y, weak[:, 1]))
    assert headline.model_value == pytest.approx(roc_auc_score(y, strong[:, 1]))
    assert headline.difference == pytest.approx(headline.model_value - headline.reference_value)
    assert 0 < headline.ci_low < headline.difference < headline.ci_high
    assert headline.p_value == pytest.approx(1 / 301)  # no replicate reached zero: the floor
    # Binary: DeLong's test on the positive class's curve, as delong_test computes it.
    expected = delong_test(y, weak[:, 1], strong[:, 1])
    assert (curve.metric, curve.test) == ("auroc_referable", "DeLong")
    assert curve.p_value == pytest.approx(expected.p_value) and curve.p_value < 1e-4
    assert (curve.ci_low, curve.ci_high) == pytest.approx((expected.ci_low, expected.ci_high))
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert list(table.columns) == ["task", "reference", "model", "metric", "reference_value", "model_value",
                                   "difference", "ci_low", "ci_high", "p_value", "test", "n_images"]
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["bootstrap"]["replicates"] == 300 and len(saved["comparisons"]) == 2
    assert (tmp_path / "cmp" / "forest.png").stat().st_size > 1000


@pytest.mark.slow
def test_identical_models_do_not_differ(binary_runs, tmp_path):
    weak_run, *_ = binary_runs
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("predictions_test.csv", "metrics_test.json"):
        (twin / name).write_bytes((weak_run / name).read_bytes())
    headline, curve = compare_runs([weak_run, twin], tmp_path / "cmp", bootstrap=100).rows
    assert headline.difference == 0 and headline.p_value == 1.0 and headline.ci_low == headline.ci_high == 0
    assert curve.difference == 0 and curve.p_value == 1.0


@pytest.mark.slow
def test_runs_are_paired_on_shared_images_and_must_agree_on_truth(binary_runs, tmp_path):
    weak_run, strong_run, y, weak, strong = binary_runs
    task = make_task("multiclass", CLASSES)
    paths = [f"img_{i:04d}.png" for i in range(200)]
    # The other run saw the images in another order and 20 fewer of them.
    order = np.random.default_rng(3).permutation(200)[:180]
    shuffled = _write_run(tmp_path / "shuffled", task, y[order], strong[order], [paths[i] for i in order])
    with pytest.warns(UserWarning, match="the 180 images both runs predicted"):
        rows = compare_runs([weak_run, shuffled], tmp_path / "cmp", bootstrap=100).rows
    kept = np.sort(order)
    assert rows[0].n_images == 180
    assert rows[0].model_value == pytest.approx(roc_auc_score(y[kept], strong[kept, 1]))
    assert rows[0].reference_value == pytest.approx(roc_auc_score(y[kept], weak[kept, 1]))

    flipped = _write_run(tmp_path / "flipped", task, 1 - y, strong)
    with pytest.raises(CompareError, match="disagree on the truth of img_0000.png"):
        compare_runs([weak_run, flipped], tmp_path / "cmp2", bootstrap=100)
    elsewhere = _write_run(tmp_path / "elsewhere", task, y, strong, [f"other_{i}.png" for i in range(200)])
    with pytest.raises(CompareError, match="share no image paths"):
        compare_runs([weak_run, elsewhere], tmp_path / "cmp3", bootstrap=100)


def test_mismatched_runs_and_bad_arguments_are_named(binary_runs, tmp_path):
    weak_run, strong_run, y, weak, _ = binary_runs
    other_classes = _write_run(tmp_path / "other", make_task("multiclass", ["a", "b"]), y, weak)
    with pytest.raises(CompareError, match="predicts \\['healthy', 'referable'\\] but .* predicts \\['a', 'b'\\]"):
        compare_runs([weak_run, other_classes], tmp_path / "c1", bootstrap=100)
    with pytest.raises(CompareError, match="at least two runs"):
        compare_runs([weak_run], tmp_path / "c2")
    with pytest.raises(CompareError, match="'r2_macro' is not a multiclass metric"):
        compare_runs([weak_run, strong_run], tmp_path / "c3", metric="r2_macro", bootstrap=100)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CompareError, match="none of .* holds predictions_test.csv"):
        compare_runs([empty, empty], tmp_path / "c4", bootstrap=100)
    with pytest.raises(CompareError, match="has no predictions_val.csv"):
        load_run(weak_run, "val")


@pytest.mark.slow
def test_multiclass_rows_per_class_and_patient_resampling(tmp_path):
    rng = np.random.default_rng(5)
    classes = ["grade_0", "grade_1", "grade_2"]
    task = make_task("multiclass", classes)
    y = np.arange(150) % 3
    noisy = rng.dirichlet(np.ones(3), 150)
    sharp = 0.5 * noisy + 0.5 * np.eye(3)[y]
    patients = [f"p{i // 3}" for i in range(150)]
    a = _write_run(tmp_path / "a", task, y, noisy, patients=patients)
    b = _write_run(tmp_path / "b", task, y, sharp, patients=patients)
    rows = compare_runs([a, b], tmp_path / "cmp", bootstrap=200).rows
    assert [r.metric for r in rows] == ["auroc_macro", "auroc_grade_0", "auroc_grade_1", "auroc_grade_2"]
    assert rows[0].difference > 0.2 and rows[0].ci_low > 0
    for c, row in enumerate(rows[1:]):
        assert row.p_value == pytest.approx(delong_test(y == c, noisy[:, c], sharp[:, c]).p_value)
    assert load_run(a).patient_ids[:4] == ["p0", "p0", "p0", "p1"]


def test_regression_runs_compare_r2(tmp_path):
    rng = np.random.default_rng(2)
    task = make_task("regression", ["age"], mean=[60.0], std=[10.0])
    truth = rng.normal(60, 10, (120, 1))
    close, far = truth + rng.normal(0, 3, (120, 1)), truth + rng.normal(0, 9, (120, 1))
    runs = [_write_run(tmp_path / "far", task, truth, far), _write_run(tmp_path / "close", task, truth, close)]
    rows = compare_runs(runs, tmp_path / "cmp", bootstrap=200).rows
    assert len(rows) == 1 and rows[0].metric == "r2_macro"  # no ROC curves, no DeLong
    assert rows[0].model_value == pytest.approx(r2_score(truth, close))
    assert rows[0].ci_low > 0


@pytest.mark.slow
def test_folders_of_runs_compare_per_task_and_wilcoxon_across_tasks(tmp_path):
    task = make_task("multiclass", CLASSES)
    gains = []
    for t in range(6):
        y, weak = _binary_scores(80, t, 1.0)
        _, strong = _binary_scores(80, 100 + t, 2.0 + 0.3 * t)
        _write_run(tmp_path / "retfound" / f"task{t}", task, y, weak)
        _write_run(tmp_path / "ours" / f"task{t}", task, y, strong)
        gains.append(roc_auc_score(y, strong[:, 1]) - roc_auc_score(y, weak[:, 1]))
    _write_run(tmp_path / "ours" / "extra", task, *_binary_scores(10, 0, 1.0))
    with pytest.warns(UserWarning, match=r"\['extra'\] have no counterpart"):
        result = compare_runs([tmp_path / "retfound", tmp_path / "ours"], tmp_path / "cmp", bootstrap=100)
    headline = [r for r in result.rows if r.test == "paired bootstrap"]
    assert [r.task for r in headline] == [f"task{t}" for t in range(6)]
    assert [r.difference for r in headline] == pytest.approx(gains)
    (entry,) = result.wilcoxon
    expected = wilcoxon(gains)
    assert entry["tasks"] == 6 and entry["model"] == "ours" and entry["reference"] == "retfound"
    assert entry["p_value"] == pytest.approx(expected.pvalue) and entry["statistic"] == expected.statistic
    assert entry["model_better"] == sum(g > 0 for g in gains)
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["wilcoxon"][0]["tasks"] == 6
