"""Regression / multi-target task: standardised targets, masked Huber/MSE, and a real training run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_manifest_config
from sklearn.metrics import r2_score

from retinafm.data.sources import DataSourceError
from retinafm.engine.checkpoint import load_checkpoint
from retinafm.settings import PredictSettings
from retinafm.tasks import make_task
from retinafm.tasks.regression import RegressionTask
from retinafm.workflows.finetune import finetune
from retinafm.workflows.predict import predict

TARGETS = ("cup_to_disc", "exudate_count")


def test_standardisation_from_train_and_inversion():
    train = np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]])
    task = RegressionTask(("a", "b")).fit(train)
    assert task.mean == pytest.approx((3.0, 20.0)) and task.std == pytest.approx((np.std([1, 3, 5]), 10.0))
    outputs = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    np.testing.assert_allclose(task.activate(outputs), [[3.0, 30.0], [3.0 - np.std([1, 3, 5]), 25.0]], rtol=1e-6)
    assert make_task("regression", ("a", "b"), **task.state()) == task


def test_missing_targets_are_masked_not_dropped():
    task = RegressionTask(("a", "b"), mean=(0.0, 0.0), std=(1.0, 2.0), huber_beta=1.0)
    outputs = torch.tensor([[0.5, 2.0], [3.0, -1.0]])
    targets = np.array([[0.0, np.nan], [1.0, 2.0]])
    # Known cells only, on standardised targets: (0.5 vs 0), (3 vs 1), (-1 vs 1).
    expected = torch.nn.functional.smooth_l1_loss(torch.tensor([0.5, 3.0, -1.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert task.loss(outputs, targets) == pytest.approx(float(expected))
    mse = RegressionTask(("a", "b"), mean=(0.0, 0.0), std=(1.0, 2.0), loss_kind="mse")
    assert mse.loss(outputs, targets) == pytest.approx((0.25 + 4.0 + 4.0) / 3)
    beta = RegressionTask(("a", "b"), mean=(0.0, 0.0), std=(1.0, 2.0), huber_beta=0.5)
    assert beta.loss(outputs, targets) != pytest.approx(float(expected))


def test_a_constant_target_is_a_clear_error():
    with pytest.raises(DataSourceError, match="'b'.*two different training values"):
        RegressionTask(("a", "b")).fit(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, np.nan]]))


@pytest.fixture(scope="module")
def regression_run(regression_manifest, tmp_path_factory):
    run = tmp_path_factory.mktemp("reg") / "run"
    return finetune(tiny_manifest_config(regression_manifest, run, task="regression"))


@pytest.mark.slow
def test_regression_training_learns_the_targets(regression_run, regression_manifest):
    run = regression_run.run_dir
    metrics = json.loads((run / "metrics_test.json").read_text())
    # R² of 0 is predicting the mean; the quantities are drawn in the image, so it must be well above.
    assert metrics["r2_macro"] > 0.3, metrics
    manifest = pd.read_csv(regression_manifest)
    test_rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
    preds = pd.read_csv(run / "predictions_test.csv")
    assert list(preds.columns) == ["path", *[f"true_{t}" for t in TARGETS], *TARGETS]
    for name in TARGETS:  # per-target R² against scikit-learn on the rows where the target is known
        known = test_rows[name].notna().to_numpy()
        assert metrics[f"n_{name}"] == known.sum()
        assert metrics[f"r2_{name}"] == pytest.approx(r2_score(test_rows.loc[known, name], preds.loc[known, name]))
    state = load_checkpoint(run / "checkpoint-best.pth")["retinafm"]
    train = manifest[manifest["split"] == "train"]
    assert state["task_state"]["mean"] == pytest.approx([train[t].mean() for t in TARGETS])
    assert state["head"]["kind"] == "linear"
    assert (run / "plots" / "scatter.png").stat().st_size > 0


@pytest.mark.slow
def test_predict_writes_targets_in_original_units(regression_run, regression_manifest, tmp_path):
    predict(PredictSettings(checkpoint=regression_run.run_dir / "checkpoint-best.pth",
                            images=regression_manifest.parent / "images", out=tmp_path / "p.csv", num_workers=0,
                            device="cpu"), progress=False)
    frame = pd.read_csv(tmp_path / "p.csv")
    assert list(frame.columns) == ["path", *TARGETS]
    evaluated = pd.read_csv(regression_run.run_dir / "predictions_test.csv").set_index("path")
    joined = frame.set_index("path").loc[evaluated.index]
    np.testing.assert_allclose(joined[list(TARGETS)].to_numpy(), evaluated[list(TARGETS)].to_numpy(), rtol=1e-4)
    assert 0.0 < frame["cup_to_disc"].mean() < 1.0 and frame["exudate_count"].mean() > 2  # original units


@pytest.mark.slow
def test_transformer_head_run_predicts_what_it_evaluated(regression_manifest, tmp_path):
    run = tmp_path / "run"
    finetune(tiny_manifest_config(regression_manifest, run, task="regression", targets="exudate_count,cup_to_disc",
                                  head="transformer", head_depth=1, head_num_heads=2, loss="mse", epochs=2))
    state = load_checkpoint(run / "checkpoint-best.pth")["retinafm"]
    assert state["head"] == {"kind": "transformer", "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "dropout": 0.1}
    assert state["class_names"] == ["exudate_count", "cup_to_disc"]  # --targets order
    predict(PredictSettings(checkpoint=run / "checkpoint-best.pth", images=regression_manifest.parent / "images",
                            out=tmp_path / "p.csv", num_workers=0, device="cpu"), progress=False)
    frame = pd.read_csv(tmp_path / "p.csv").set_index("path")
    evaluated = pd.read_csv(run / "predictions_test.csv").set_index("path")
    assert list(frame.columns) == ["exudate_count", "cup_to_disc"]
    np.testing.assert_allclose(frame.loc[evaluated.index].to_numpy(), evaluated[list(frame.columns)].to_numpy(),
                               rtol=1e-4)
