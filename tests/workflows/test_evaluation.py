"""`evaluate` writes the same numbers scikit-learn computes from its own predictions file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from retinafm.data.sources import DataSourceError
from retinafm.settings import EvaluateSettings
from retinafm.stats.bootstrap import bootstrap_samples
from retinafm.workflows.evaluate import evaluate


@pytest.mark.slow
def test_evaluate_checkpoint_writes_metrics_that_match_sklearn(trained_run, demo_data, tmp_path):
    out = tmp_path / "eval"
    ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=out, data_path=str(demo_data),
                                   num_workers=0, bootstrap=200, seed=3))
    assert {p.name for p in out.iterdir()} >= {"metrics_test.json", "metrics_test.csv", "predictions_test.csv", "plots",
                                                "report.html"}
    assert {p.name for p in (out / "plots").iterdir()} >= {"confusion_matrix.png", "roc.png"}
    metrics = json.loads((out / "metrics_test.json").read_text())
    preds = pd.read_csv(out / "predictions_test.csv")
    classes = ["diabetic_retinopathy", "glaucoma", "normal"]
    y = preds["label"].map(classes.index).to_numpy()
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert metrics["auroc_macro"] == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y, probs.argmax(1)))
    assert ev.metrics["n"] == len(preds) == 24
    # Same checkpoint, same split: the run's own test metrics.
    run_metrics = json.loads((trained_run / "metrics_test.json").read_text())
    assert run_metrics["auroc_macro"] == pytest.approx(metrics["auroc_macro"], abs=1e-6)

    # The CI is the percentile interval of sklearn's AUROC over class-stratified replicates.
    assert metrics["bootstrap"] == {"replicates": 200, "seed": 3, "level": 0.95, "method": "percentile",
                                    "unit": "image", "stratified": True}
    replicates = [roc_auc_score(y[rows], probs[rows], multi_class="ovr", average="macro")
                  for rows in bootstrap_samples(len(y), 200, 3, strata=y)]
    assert metrics["ci"]["auroc_macro"] == pytest.approx(list(np.percentile(replicates, [2.5, 97.5])), abs=1e-9)
    accuracies = [accuracy_score(y[rows], probs[rows].argmax(1))
                  for rows in bootstrap_samples(len(y), 200, 3, strata=y)]
    assert metrics["ci"]["accuracy"] == pytest.approx(list(np.percentile(accuracies, [2.5, 97.5])), abs=1e-9)
    assert "n" not in metrics["ci"] and set(metrics["ci"]) >= {"kappa", "mcc", "f1_macro", "ece", "auroc_glaucoma"}
    table = pd.read_csv(out / "metrics_test.csv").set_index("metric")
    assert list(table.columns) == ["value", "ci_low", "ci_high"]
    assert table.loc["auroc_macro", "ci_low"] == pytest.approx(metrics["ci"]["auroc_macro"][0])
    assert np.isnan(table.loc["n", "ci_low"])
    assert metrics["task"] == {"name": "multiclass", "outputs": classes,
                               "state": {"selection_metric": "auroc_macro", "grade_order": None}}


@pytest.mark.filterwarnings("ignore:class 'glaucoma' has no positives")  # expected: the set has no glaucoma
def test_external_set_with_other_class_names_via_label_map(trained_run, demo_data, tmp_path):
    import shutil

    external = tmp_path / "external"
    shutil.copytree(demo_data / "test" / "normal", external / "healthy")
    shutil.copytree(demo_data / "test" / "diabetic_retinopathy", external / "DR")
    with pytest.raises(DataSourceError,
                       match=r"\['DR', 'healthy'\].*--label-map DR=<model class>,healthy=<model class>"):
        evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e0",
                                  data_path=str(external), bootstrap=0))
    with pytest.raises(DataSourceError, match=r"--label-map names \['cataract'\]"):
        evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e1",
                                  data_path=str(external), bootstrap=0, label_map="cataract=normal"))
    label_map = {"healthy": "normal", "DR": "diabetic_retinopathy"}
    with pytest.warns(UserWarning, match="no examples of \\['glaucoma'\\]"):
        ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e",
                                       data_path=str(external), num_workers=0,
                                       label_map="healthy=normal,DR=diabetic_retinopathy", bootstrap=0))
    metrics = json.loads((tmp_path / "e" / "metrics_test.json").read_text())
    assert metrics["absent_classes"] == ["glaucoma"] and metrics["label_map"] == label_map
    assert ev.metrics["n"] == 16 and np.isnan(ev.metrics["auroc_glaucoma"])
    preds = pd.read_csv(tmp_path / "e" / "predictions_test.csv")
    assert set(preds["label"]) == {"normal", "diabetic_retinopathy"}


def test_patient_level_bootstrap_and_ordinal_kappa(trained_run, demo_data, tmp_path):
    images = sorted((demo_data / "test").rglob("*.png"))
    rows = [{"path": str(p), "split": "test", "label": p.parent.name, "patient_id": f"p{i // 2}"}
            for i, p in enumerate(images)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e",
                                   manifest=str(tmp_path / "m.csv"), num_workers=0, bootstrap=100, ordinal=True))
    metrics = json.loads((tmp_path / "e" / "metrics_test.json").read_text())
    assert metrics["bootstrap"]["unit"] == "patient"
    preds = pd.read_csv(tmp_path / "e" / "predictions_test.csv")
    assert list(preds.columns[:2]) == ["path", "patient_id"]
    y = preds["label"].map(list(ev.task.output_names).index).to_numpy()
    pred = preds[[f"prob_{c}" for c in ev.task.output_names]].to_numpy().argmax(1)
    assert metrics["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert "quadratic_kappa" in metrics["ci"]


def test_evaluate_on_a_manifest_with_a_subset_of_classes(trained_run, demo_data, tmp_path):
    rows = [{"path": str(p), "split": "test", "label": p.parent.name}
            for p in sorted((demo_data / "test").rglob("*.png")) if p.parent.name != "glaucoma"]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    with pytest.warns(UserWarning):
        ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e",
                                       manifest=str(tmp_path / "m.csv"), num_workers=0, bootstrap=0))
    assert ev.metrics["n"] == 16 and np.isnan(ev.metrics["auroc_glaucoma"])


def test_unknown_classes_and_missing_split(trained_run, demo_data, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(demo_data, data)
    shutil.copytree(data / "train" / "normal", data / "train" / "cataract")
    with pytest.raises(DataSourceError, match="'cataract'.*not among the model's classes"):
        evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e",
                                  data_path=str(data), bootstrap=0))
    with pytest.raises(DataSourceError, match="no 'holdout' images"):
        evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e2",
                                  data_path=str(demo_data), split="holdout"))


def test_external_folder_without_train_split_or_without_splits(trained_run, demo_data, tmp_path):
    import shutil

    external = tmp_path / "external"
    shutil.copytree(demo_data / "test" / "normal", external / "normal")
    shutil.copytree(demo_data / "test" / "glaucoma", external / "glaucoma")
    with pytest.warns(UserWarning, match="diabetic_retinopathy"):
        ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e",
                                       data_path=str(external), num_workers=0, bootstrap=0))
    assert ev.metrics["n"] == 16
    only_test = tmp_path / "only_test"
    shutil.copytree(demo_data / "test", only_test / "test")
    ev = evaluate(EvaluateSettings(checkpoint=trained_run / "checkpoint-best.pth", out=tmp_path / "e2",
                                   data_path=str(only_test), num_workers=0, bootstrap=0))
    assert ev.metrics["n"] == 24
