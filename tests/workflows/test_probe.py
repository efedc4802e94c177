"""retinafm probe: linear and kNN probes on embeddings, their run directory, and their checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from retinafm.data.embeddings import Embeddings, read_embeddings
from retinafm.data.sources import DataSourceError
from retinafm.files import OutputExistsError
from retinafm.settings import EmbedSettings, PredictSettings
from retinafm.tasks import make_task
from retinafm.workflows.embed import embed
from retinafm.workflows.predict import predict
from retinafm.workflows.probe import ProbeSettings, choose_strength, fit_linear, probe

CLASSES = ["diabetic_retinopathy", "glaucoma", "normal"]


def tiny(**overrides) -> EmbedSettings:
    settings = dict(model="vit_micro_patch8", weights="none", input_size=32, batch_size=16, num_workers=0,
                    device="cpu", dtype="float32")
    settings.update(overrides)
    return EmbedSettings(**settings)


@pytest.fixture(scope="module")
def demo_embeddings(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "demo.parquet"
    return embed(demo_data, out, tiny(), progress=False).out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.slow
def test_probe_on_tiny_data_is_above_chance_and_writes_a_run(demo_embeddings, tmp_path):
    result = probe(demo_embeddings, tmp_path / "run", ProbeSettings(bootstrap=200), quiet=True)
    test = json.loads((tmp_path / "run" / "metrics_test.json").read_text())
    assert test["auroc_macro"] > 0.7 and test["accuracy"] > 1 / 3  # three balanced classes: chance 0.5 / 0.33
    lo, hi = test["ci"]["auroc_macro"]
    assert lo <= test["auroc_macro"] <= hi
    knn = json.loads((tmp_path / "run" / "knn" / "metrics_test.json").read_text())
    assert knn["auroc_macro"] > 0.5
    predictions = pd.read_csv(tmp_path / "run" / "predictions_test.csv")
    assert list(predictions.columns[:2]) == ["path", "label"] or predictions.columns[0] == "path"
    assert [f"prob_{c}" for c in CLASSES] == [c for c in predictions.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predictions[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    grid = pd.read_csv(tmp_path / "run" / "probe_grid.csv")
    assert list(grid.columns) == ["C", "auroc_macro", "scheme"] and (grid["scheme"] == "validation").all()
    assert result.strength in grid["C"].tolist()
    assert grid.loc[grid["C"] == result.strength, "auroc_macro"].iloc[0] == grid["auroc_macro"].max()
    for name in ("report.html", "config.yaml", "data_summary.csv", "checkpoint-best.pth", "metrics_val.csv",
                 "plots/probe_grid.png"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = pd.read_csv(tmp_path / "run" / "data_summary.csv").set_index("split")
    assert summary.loc["train", CLASSES].tolist() == [24, 24, 24]


def test_multiclass_head_is_scikit_learns_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 12)) * rng.uniform(0.1, 10, size=12) + rng.normal(size=12)
    y = np.repeat([0, 1, 2], 30)
    x[y == 1, 0] += 3
    task = make_task("multiclass", ["a", "b", "c"])
    head = fit_linear(task, x, y, 0.5, ProbeSettings())
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(x, y)
    np.testing.assert_allclose(_softmax(head.logits(x)), reference.predict_proba(x), atol=1e-6)
    # Binary: two softmax outputs with scikit-learn's odds.
    binary = make_task("multiclass", ["no", "yes"])
    head = fit_linear(binary, x[:60], y[:60], 1.0, ProbeSettings())
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x[:60], y[:60])
    np.testing.assert_allclose(_softmax(head.logits(x[:60])), reference.predict_proba(x[:60]), atol=1e-6)


def test_regression_head_is_ridge_on_standardised_features_and_targets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 6)) * 5
    y = (x @ rng.normal(size=(6, 2)) + rng.normal(size=(80, 2))) * [0.1, 30] + [0.5, 100]
    task = make_task("regression", ["cdr", "count"]).fit(y)
    head = fit_linear(task, x, y, 10.0, ProbeSettings(task="regression", columns="cdr,count"))
    predicted = task.activate(torch.from_numpy(head.logits(x).astype(np.float32)))
    for j in range(2):
        mean, std = y[:, j].mean(), y[:, j].std()
        reference = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(x, (y[:, j] - mean) / std)
        np.testing.assert_allclose(predicted[:, j], reference.predict(x) * std + mean, rtol=1e-4, atol=1e-4)


def test_without_validation_the_strength_is_chosen_by_k_fold(demo_embeddings, tmp_path):
    emb = read_embeddings(demo_embeddings)
    keep = emb.frame["split"] != "val"
    no_val = Embeddings(emb.frame[keep].reset_index(drop=True), emb.vectors[keep.to_numpy()], emb.info)
    result = probe(no_val, tmp_path / "run", ProbeSettings(bootstrap=0, folds=4), quiet=True)
    assert (result.grid["scheme"] == "4-fold").all()
    assert "val" not in result.evaluations and (tmp_path / "run" / "metrics_test.json").is_file()
    task = make_task("multiclass", ["a", "b"])
    with pytest.raises(DataSourceError, match="at least 2 training images of every class"):
        choose_strength(task, np.zeros((3, 2)), np.array([0, 0, 1]), None, ProbeSettings())


def test_probe_checkpoint_predicts_through_retinafm_predict(demo_embeddings, demo_data, tmp_path):
    probe(demo_embeddings, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)
    expected = pd.read_csv(tmp_path / "run" / "predictions_test.csv").set_index("path")
    result = predict(PredictSettings(checkpoint=tmp_path / "run" / "checkpoint-best.pth", images=demo_data / "test",
                                     out=tmp_path / "p.csv", num_workers=0, device="cpu"), progress=False)
    got = pd.read_csv(result.out).set_index("path").loc[expected.index]
    columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(got[columns].to_numpy(), expected[columns].to_numpy(), atol=1e-4)
    assert (got["prediction"] == expected["prediction"]).all()


def test_backbone_is_referenced_by_weights_file_not_copied(demo_data, tmp_path):
    from retinafm.models.registry import create_model, get_spec

    torch.manual_seed(7)
    source = create_model(get_spec("vit_micro_patch8"), 0, input_size=32)
    weights = tmp_path / "backbone.pth"
    torch.save({"model": source.state_dict()}, weights)
    emb = embed(demo_data, tmp_path / "e.parquet", tiny(weights=str(weights)), progress=False).out
    probe(emb, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoint-best.pth", weights_only=True)
    assert sorted(state["model"]) == ["head.bias", "head.weight"]
    assert state["retinafm"]["backbone"]["weights_file"] == str(weights)
    expected = pd.read_csv(tmp_path / "run" / "predictions_test.csv").set_index("path")
    got = pd.read_csv(predict(PredictSettings(checkpoint=tmp_path / "run" / "checkpoint-best.pth",
                                              images=demo_data / "test", out=tmp_path / "p.csv", num_workers=0,
                                              device="cpu"), progress=False).out).set_index("path").loc[expected.index]
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(), atol=1e-4)
    weights.unlink()  # the reference is named when it is gone
    with pytest.raises(Exception, match="backbone.pth"):
        predict(PredictSettings(checkpoint=tmp_path / "run" / "checkpoint-best.pth", images=demo_data / "test",
                                out=tmp_path / "q.csv", num_workers=0, device="cpu"), progress=False)


def test_probe_on_a_finetuned_checkpoints_features(trained_run, demo_data, tmp_path):
    emb = embed(demo_data, tmp_path / "e.parquet",
                EmbedSettings(checkpoint=str(trained_run / "checkpoint-best.pth"), num_workers=0, device="cpu",
                              dtype="float32"), progress=False).out
    probe(emb, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoint-best.pth", weights_only=True)
    assert state["retinafm"]["backbone"] == {"checkpoint": str((trained_run / "checkpoint-best.pth").resolve())}
    expected = pd.read_csv(tmp_path / "run" / "predictions_test.csv").set_index("path")
    got = pd.read_csv(predict(PredictSettings(checkpoint=tmp_path / "run" / "checkpoint-best.pth",
                                              images=demo_data / "test", out=tmp_path / "p.csv", num_workers=0,
                                              device="cpu"), progress=False).out).set_index("path").loc[expected.index]
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(), atol=1e-4)


@pytest.mark.slow
def test_multilabel_and_regression_probes(multilabel_manifest, regression_manifest, tmp_path):
    labels = [c for c in pd.read_csv(multilabel_manifest).columns if c not in ("path", "split", "patient_id")]
    emb = embed(multilabel_manifest, tmp_path / "ml.parquet", tiny(input_size=64), progress=False).out
    result = probe(emb, tmp_path / "ml", ProbeSettings(task="multilabel", columns=",".join(labels), bootstrap=0,
                                                        threshold=None), quiet=True)
    assert result.task.name == "multilabel" and list(result.task.output_names) == labels
    metrics = json.loads((tmp_path / "ml" / "metrics_test.json").read_text())
    assert 0.0 <= metrics["auroc_macro"] <= 1.0
    predictions = pd.read_csv(tmp_path / "ml" / "predictions_test.csv")
    assert predictions.columns[0] == "path" and all(f"prob_{n}" in predictions.columns for n in labels)

    targets = [c for c in pd.read_csv(regression_manifest).columns if c not in ("path", "split", "patient_id")]
    emb = embed(regression_manifest, tmp_path / "rg.parquet", tiny(input_size=64), progress=False).out
    result = probe(emb, tmp_path / "rg", ProbeSettings(task="regression", columns=",".join(targets), bootstrap=0),
                   quiet=True)
    assert list(result.grid.columns) == ["alpha", "r2_macro", "scheme"]
    predictions = pd.read_csv(tmp_path / "rg" / "predictions_test.csv")
    assert predictions.columns[0] == "path" and all(t in predictions.columns for t in targets)


@pytest.mark.parametrize("edit,settings,message", [
    (lambda f: f.drop(columns="split"), {}, "no 'split' column"),
    (lambda f: f.assign(split="training"), {}, r"unknown value\(s\) \['training'\]"),
    (lambda f: f.assign(label="normal"), {}, "a classifier needs at least two"),
    (lambda f: f, dict(label_column="grade"), "no 'grade' column"),
    (lambda f: f, dict(task="multilabel"), "needs --labels"),
    (lambda f: f, dict(task="regression", columns="cdr"), r"no column\(s\) \['cdr'\]"),
    (lambda f: f.assign(cdr="high"), dict(task="regression", columns="cdr"), "must hold numbers"),
    (lambda f: f.assign(dme=2), dict(task="multilabel", columns="dme"), "must hold 0 or 1"),
    (lambda f: f, dict(bootstrap=20), "--bootstrap must be 0 or at least 100"),  # the settings' own check
    (lambda f: f, dict(task="survival"), "--task must be one of"),
])
def test_bad_input_is_named(edit, settings, message, demo_embeddings, tmp_path):
    emb = read_embeddings(demo_embeddings)
    emb = Embeddings(edit(emb.frame.copy()), emb.vectors, emb.info)
    with pytest.raises(DataSourceError, match=message):
        probe(emb, tmp_path / "run", ProbeSettings(**settings), quiet=True)


def test_label_only_outside_train_is_refused_and_existing_run_kept(demo_embeddings, tmp_path):
    emb = read_embeddings(demo_embeddings)
    frame = emb.frame.copy()
    frame.loc[frame.index[frame["split"] == "test"][:2], "label"] = "amd"
    with pytest.raises(DataSourceError, match=r"\['amd'\] appear outside the train split"):
        probe(Embeddings(frame, emb.vectors, emb.info), tmp_path / "run", ProbeSettings(), quiet=True)
    probe(demo_embeddings, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)
    with pytest.raises(OutputExistsError, match="already exists"):
        probe(demo_embeddings, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)


@pytest.mark.slow
def test_probe_on_flip_averaged_embeddings_predicts_the_same_way(demo_data, tmp_path):
    emb = embed(demo_data, tmp_path / "e.parquet", tiny(tta_flip=True), progress=False).out
    probe(emb, tmp_path / "run", ProbeSettings(bootstrap=0), quiet=True)
    assert torch.load(tmp_path / "run" / "checkpoint-best.pth", weights_only=True)["retinafm"]["tta_flip"] is True
    expected = pd.read_csv(tmp_path / "run" / "predictions_test.csv").set_index("path")
    got = pd.read_csv(predict(PredictSettings(checkpoint=tmp_path / "run" / "checkpoint-best.pth",
                                              images=demo_data / "test", out=tmp_path / "p.csv", num_workers=0,
                                              device="cpu"), progress=False).out).set_index("path").loc[expected.index]
    np.testing.assert_allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(), atol=1e-4)
