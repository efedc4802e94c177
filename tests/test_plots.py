"""Each plot function writes one valid, reasonably sized PNG atomically, for binary and multi-class data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.evaluate.metrics import confusion
from retinafm.evaluate.plots import plot_confusion_matrix, plot_pr, plot_roc, plot_training_curves


def _assert_png(path, min_side=200):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # decodes the whole file: a truncated PNG fails here
        assert min(img.size) >= min_side


def _predictions(c: int, n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.ones(c), n) + np.eye(c)[y]
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("c", [2, 4])
def test_classification_plots(tmp_path, c):
    y, p = _predictions(c)
    names = [f"class {i}" for i in range(c)]
    cm = confusion(y, p.argmax(1), c)
    out = tmp_path / "new" / "sub"  # parent folders are created
    written = [
        plot_confusion_matrix(cm, names, out / "cm.png"),
        plot_confusion_matrix(cm, names, out / "cm_norm.png", normalize=True),
        plot_roc(y, p, names, out / "roc.png"),
        plot_pr(y, p, names, out / "pr.png"),
    ]
    assert written == [out / "cm.png", out / "cm_norm.png", out / "roc.png", out / "pr.png"]
    for path in written:
        _assert_png(path)
    assert sorted(x.name for x in out.iterdir()) == ["cm.png", "cm_norm.png", "pr.png", "roc.png"]  # no temp files


def test_curves_skip_a_class_absent_from_the_set(tmp_path):
    y, p = _predictions(3)
    y[y == 2] = 0
    names = ["a", "b", "c"]
    _assert_png(plot_roc(y, p, names, tmp_path / "roc.png"))
    _assert_png(plot_pr(y, p, names, tmp_path / "pr.png"))
    _assert_png(plot_confusion_matrix(confusion(y, p.argmax(1), 3), names, tmp_path / "cm.png", normalize=True))


def test_plot_replaces_an_existing_file(tmp_path):
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    y, p = _predictions(2)
    _assert_png(plot_roc(y, p, ["a", "b"], target))


def _log(rows: int, metrics: bool = True) -> pd.DataFrame:
    log = pd.DataFrame({"epoch": range(rows), "lr": np.linspace(1e-4, 1e-3, rows),
                        "train_loss": np.linspace(1, 0.3, rows), "val_loss": np.linspace(1.1, 0.5, rows)})
    if metrics:
        log["val_auroc_macro"] = np.linspace(0.5, 0.95, rows)
        log["val_accuracy"] = np.linspace(0.3, 0.8, rows)
        log["val_kappa"] = np.linspace(-0.1, 0.7, rows)
        log["val_auroc_class a"] = np.linspace(0.4, 0.9, rows)  # per-class columns are ignored
    return log


@pytest.mark.parametrize("rows", [1, 12])
def test_training_curves(tmp_path, rows):
    _assert_png(plot_training_curves(_log(rows), tmp_path / "plots" / "curves.png"))


def test_training_curves_without_metrics_or_with_nan(tmp_path):
    _assert_png(plot_training_curves(_log(3, metrics=False), tmp_path / "bare.png"))
    log = _log(3)
    log["val_auroc_macro"] = np.nan  # a class missing from validation
    _assert_png(plot_training_curves(log, tmp_path / "nan.png"))
