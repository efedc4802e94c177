"""Multi-label task: masked BCE, positive weights, Youden thresholds, and a real training run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_manifest_config
from sklearn.metrics import roc_auc_score

from retinafm.engine.checkpoint import load_checkpoint
from retinafm.settings import PredictSettings
from retinafm.tasks import make_task
from retinafm.tasks.multilabel import MultilabelTask
from retinafm.workflows.finetune import finetune
from retinafm.workflows.predict import predict

NAMES = ("large_cup", "haemorrhages", "exudates")


def test_loss_ignores_unknown_cells_and_applies_positive_weights():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    targets = np.array([[1.0, np.nan], [0.0, 1.0], [np.nan, 0.0]])
    task = make_task("multilabel", ["a", "b"])
    known = ~np.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[torch.from_numpy(known)], torch.tensor(targets[known], dtype=torch.float32))
    assert task.loss(logits, targets) == pytest.approx(float(expected), rel=1e-6)

    train = np.array([[1, 0], [0, 0], [0, 1], [0, 0], [np.nan, 1]], dtype=float)
    weighted = MultilabelTask(("a", "b"), use_pos_weight=True).fit(train)
    assert weighted.pos_weight == pytest.approx((3 / 1, 3 / 2))  # negatives / positives per label
    loss = weighted.train_loss()(logits, torch.tensor(targets, dtype=torch.float32))
    per = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(torch.tensor(targets, dtype=torch.float32)),
        pos_weight=torch.tensor([3.0, 1.5]), reduction="none")
    torch.testing.assert_close(loss, per[torch.from_numpy(known)].mean())


def test_smoothing_moves_targets_towards_one_half():
    logits, targets = torch.zeros(1, 1), torch.ones(1, 1)
    smoothed = MultilabelTask(("a",)).train_loss(0.2)(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.9]]))
    torch.testing.assert_close(smoothed, expected)


def test_youden_thresholds_are_chosen_on_validation_and_kept_in_the_state():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (200, 2)).astype(float)
    probs = np.clip(0.15 + 0.2 * targets + rng.normal(0, 0.08, targets.shape), 0, 1)  # separable near 0.25
    fixed = MultilabelTask(NAMES[:2], threshold=0.5)
    assert fixed.calibrate(targets, probs) is fixed  # a fixed threshold stays fixed
    assert fixed.metrics(targets, probs)["sensitivity_macro"] < 0.3  # 0.5 is far too high here
    youden = MultilabelTask(NAMES[:2], threshold=None).calibrate(targets, probs)
    assert all(0.2 < t < 0.35 for t in youden.thresholds)
    assert youden.metrics(targets, probs)["sensitivity_macro"] > 0.9
    rebuilt = make_task("multilabel", NAMES[:2], **youden.state())
    assert rebuilt == youden and json.dumps(youden.state())  # plain types, checkpoint-safe


def test_prediction_frame_columns():
    task = MultilabelTask(("a", "b"), thresholds=(0.5, 0.3))
    probs = np.array([[0.6, 0.2], [0.4, 0.35]])
    frame = task.prediction_frame(["x.png", "y.png"], probs, np.array([[1.0, np.nan], [0.0, 1.0]]))
    assert list(frame.columns) == ["path", "prediction", "true_a", "true_b", "prob_a", "prob_b"]
    assert list(frame["prediction"]) == ["a", "b"]
    assert frame["true_b"].isna().tolist() == [True, False]


@pytest.fixture(scope="module")
def multilabel_run(multilabel_manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("ml") / "run"
    cfg = tiny_manifest_config(multilabel_manifest, run, task="multilabel", threshold="youden", pos_weight=True)
    return finetune(cfg)


@pytest.mark.slow
def test_multilabel_training_learns_the_findings(multilabel_run, multilabel_manifest):
    run = multilabel_run.run_dir
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert metrics["n"] == 40
    # Chance is 0.5; the findings are visible, so a short run must be clearly above it.
    assert metrics["auroc_macro"] > 0.75, metrics
    manifest = pd.read_csv(multilabel_manifest)
    test_rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
    preds = pd.read_csv(run / "predictions_test.csv")
    assert list(preds.columns) == ["path", "prediction", *[f"true_{n}" for n in NAMES], *[f"prob_{n}" for n in NAMES]]
    for name in NAMES:  # per-label AUROC against scikit-learn on the rows where the label is known
        known = test_rows[name].notna().to_numpy()
        assert metrics[f"n_{name}"] == known.sum()
        expected = roc_auc_score(test_rows.loc[known, name], preds.loc[known, f"prob_{name}"])
        assert metrics[f"auroc_{name}"] == pytest.approx(expected, abs=1e-9)
    best = load_checkpoint(run / "checkpoint-best.pth")["retinafm"]
    assert best["task"] == "multilabel" and best["class_names"] == list(NAMES)
    assert len(best["task_state"]["thresholds"]) == 3
    assert [metrics[f"threshold_{n}"] for n in NAMES] == pytest.approx(best["task_state"]["thresholds"])
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 0
    log = pd.read_csv(run / "log.csv")
    assert int(log["val_auroc_macro"].idxmax()) == multilabel_run.best_epoch or \
        log["val_auroc_macro"].max() == log.loc[multilabel_run.best_epoch, "val_auroc_macro"]


@pytest.mark.slow
def test_predict_uses_the_saved_thresholds(multilabel_run, multilabel_manifest, tmp_path):
    images = multilabel_manifest.parent / "images"
    result = predict(PredictSettings(checkpoint=multilabel_run.run_dir / "checkpoint-best.pth", images=images,
                                     out=tmp_path / "p.csv", num_workers=0, device="cpu"), progress=False)
    frame = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(frame.columns) == ["path", "prediction", *[f"prob_{n}" for n in NAMES]]
    assert len(frame) == len(list(images.iterdir()))
    thresholds = load_checkpoint(multilabel_run.run_dir / "checkpoint-best.pth")["retinafm"]["task_state"]["thresholds"]
    # In memory: a Youden threshold is one of the validation probabilities, so compare unrounded values.
    expected = [";".join(n for n, t in zip(NAMES, thresholds, strict=True) if row[f"prob_{n}"] >= t)
                for _, row in result.predictions.iterrows()]
    assert list(result.predictions["prediction"]) == expected == list(frame["prediction"])
    assert 0 < sum(map(bool, expected)) < len(expected)
