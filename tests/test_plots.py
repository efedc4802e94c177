from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm.evaluate.plots import plot_confusion_matrix, plot_pr, plot_roc, plot_training_curves


def _is_png(path, min_side=200):
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side


@pytest.mark.parametrize("c", [2, 4])
def test_classification_plots(tmp_path, c):
    rng = np.random.default_rng(0)
    y = rng.integers(0, c, 80)
    p = rng.dirichlet(np.ones(c), 80) + np.eye(c)[y]
    p /= p.sum(1, keepdims=True)
    names = [f"class {i}" for i in range(c)]
    cm = np.bincount(y * c + p.argmax(1), minlength=c * c).reshape(c, c)
    for fn, args in ((plot_confusion_matrix, (cm, names)), (plot_roc, (y, p, names)), (plot_pr, (y, p, names))):
        out = fn(*args, tmp_path / "sub" / f"{fn.__name__}.png")
        _is_png(out)
    _is_png(plot_confusion_matrix(cm, names, tmp_path / "norm.png", normalize=True))
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == sorted(
        ["plot_confusion_matrix.png", "plot_roc.png", "plot_pr.png"])  # no temporary files left


@pytest.mark.parametrize("rows", [1, 12])
def test_training_curves(tmp_path, rows):
    log = pd.DataFrame({"epoch": range(rows), "lr": np.linspace(1e-4, 1e-3, rows),
                        "train_loss": np.linspace(1, 0.3, rows), "val_loss": np.linspace(1.1, 0.5, rows),
                        "val_auroc_macro": np.linspace(0.5, 0.95, rows), "val_accuracy": np.linspace(0.3, 0.8, rows),
                        "val_kappa": np.linspace(-0.1, 0.7, rows)})
    _is_png(plot_training_curves(log, tmp_path / "curves.png"))
