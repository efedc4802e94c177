"""`evaluate` writes the same numbers scikit-learn computes from its own predictions file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from retinafm.data.sources import DataSourceError
from retinafm.evaluate.evaluation import evaluate_checkpoint


def test_evaluate_checkpoint_writes_metrics_that_match_sklearn(trained_run, demo_data, tmp_path):
    out = tmp_path / "eval"
    ev = evaluate_checkpoint(trained_run / "checkpoint-best.pth", out, data_path=str(demo_data), num_workers=0)
    assert {p.name for p in out.iterdir()} >= {"metrics_test.json", "metrics_test.csv", "predictions_test.csv", "plots"}
    assert {p.name for p in (out / "plots").iterdir()} >= {"confusion_matrix.png", "roc.png"}
    metrics = json.loads((out / "metrics_test.json").read_text())
    preds = pd.read_csv(out / "predictions_test.csv")
    classes = ["diabetic_retinopathy", "glaucoma", "normal"]
    y = preds["label"].map(classes.index).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    assert metrics["auroc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y, probs.argmax(1)))
    assert ev.metrics["n"] == len(preds) == 24
    # Same checkpoint, same split: the run's own test metrics.
    run_metrics = json.loads((trained_run / "metrics_test.json").read_text())
    assert run_metrics["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-6)


def test_evaluate_on_a_manifest_with_a_subset_of_classes(trained_run, demo_data, tmp_path):
    rows = [{"path": str(p), "split": "test", "label": p.parent.name}
            for p in sorted((demo_data / "test").rglob("*.png")) if p.parent.name != "glaucoma"]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    with pytest.warns(UserWarning):
        ev = evaluate_checkpoint(trained_run / "checkpoint-best.pth", tmp_path / "e", manifest=str(tmp_path / "m.csv"),
                                 num_workers=0)
    assert ev.metrics["n"] == 16 and np.isnan(ev.metrics["auroc_glaucoma"])


def test_unknown_classes_and_missing_split(trained_run, demo_data, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(demo_data, data)
    shutil.copytree(data / "train" / "normal", data / "train" / "cataract")
    with pytest.raises(DataSourceError, match="'cataract'.*not among the model's classes"):
        evaluate_checkpoint(trained_run / "checkpoint-best.pth", tmp_path / "e", data_path=str(data))
    with pytest.raises(DataSourceError, match="no 'holdout' images"):
        evaluate_checkpoint(trained_run / "checkpoint-best.pth", tmp_path / "e2", data_path=str(demo_data),
                            split="holdout")


def test_external_folder_without_train_split_or_without_splits(trained_run, demo_data, tmp_path):
    import shutil

    external = tmp_path / "external"
    shutil.copytree(demo_data / "test" / "normal", external / "normal")
    shutil.copytree(demo_data / "test" / "glaucoma", external / "glaucoma")
    with pytest.warns(UserWarning, match="diabetic_retinopathy"):
        ev = evaluate_checkpoint(trained_run / "checkpoint-best.pth", tmp_path / "e", data_path=str(external),
                                 num_workers=0)
    assert ev.metrics["n"] == 16
    only_test = tmp_path / "only_test"
    shutil.copytree(demo_data / "test", only_test / "test")
    ev = evaluate_checkpoint(trained_run / "checkpoint-best.pth", tmp_path / "e2", data_path=str(only_test),
                             num_workers=0)
    assert ev.metrics["n"] == 24
