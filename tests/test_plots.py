"""Each plot function writes one valid, reasonably sized PNG atomically, for binary, multi-class,
multi-label and regression data, degenerate sets included."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retinafm import plots
from retinafm.plots import (
    plot_confusion_matrix,
    plot_multilabel_confusion,
    plot_multilabel_pr,
    plot_multilabel_roc,
    plot_pr,
    plot_regression_scatter,
    plot_roc,
    plot_training_curves,
)
from retinafm.stats.metrics import confusion, multilabel_confusion


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


def _multilabel(n: int = 120, labels: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + 2 * (y - 0.5))))
    y[rng.random(y.shape) < 0.2] = np.nan
    return y, p


@pytest.mark.parametrize("labels", [1, 6])
def test_multilabel_plots(tmp_path, labels):
    y, p = _multilabel(labels=labels)
    names = [f"finding {i}" for i in range(labels)]
    cms = multilabel_confusion(y, p, 0.5)
    written = [
        plot_multilabel_confusion(cms, names, tmp_path / "cm.png"),
        plot_multilabel_roc(y, p, names, tmp_path / "roc.png"),
        plot_multilabel_pr(y, p, names, tmp_path / "pr.png"),
    ]
    assert written == [tmp_path / "cm.png", tmp_path / "roc.png", tmp_path / "pr.png"]
    for path in written:
        _assert_png(path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cm.png", "pr.png", "roc.png"]  # no temp files


def test_multilabel_confusion_grid_grows_with_labels(tmp_path):
    one = plot_multilabel_confusion(multilabel_confusion(*_multilabel(labels=1), 0.5), ["a"], tmp_path / "1.png")
    six = plot_multilabel_confusion(multilabel_confusion(*_multilabel(labels=6), 0.5), list("abcdef"),
                                    tmp_path / "6.png")
    with Image.open(one) as small, Image.open(six) as large:
        assert large.size[0] > 2 * small.size[0] and large.size[1] > 1.5 * small.size[1]  # 4 columns, 2 rows


def test_multilabel_plots_with_degenerate_labels(tmp_path):
    y, p = _multilabel(labels=3)
    y[y[:, 0] == 1, 0] = 0  # no positives
    y[:, 2] = np.nan  # never known
    names = ["srf", "irf", "ped"]
    _assert_png(plot_multilabel_roc(y, p, names, tmp_path / "roc.png"))
    _assert_png(plot_multilabel_pr(y, p, names, tmp_path / "pr.png"))
    _assert_png(plot_multilabel_confusion(multilabel_confusion(y, p, 0.5), names, tmp_path / "cm.png"))


def test_multilabel_confusion_plot_checks_shape(tmp_path):
    with pytest.raises(ValueError, match="2x2"):
        plot_multilabel_confusion(np.zeros((2, 2, 2)), ["a", "b", "c"], tmp_path / "cm.png")
    assert not list(tmp_path.iterdir())


def _regression(n: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.normal(60, 12, n), rng.normal(23.5, 1, n), rng.normal(0, 1, n)])
    return y, y + rng.normal(0, 1, y.shape)


def test_regression_scatter(tmp_path):
    y, p = _regression()
    _assert_png(plot_regression_scatter(y, p, ["age", "axial length", "SE"], tmp_path / "scatter.png"))


def test_regression_scatter_degenerate_targets(tmp_path, recwarn):
    y, p = _regression(n=5)
    y[1:, 0] = np.nan  # a single known row
    y[:, 1] = np.nan  # none
    p[:, 2] = 1.0  # constant predictions
    _assert_png(plot_regression_scatter(y, p, ["age", "axial length", "SE"], tmp_path / "scatter.png"))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # the metrics already warned


def test_training_curves_for_regression_clip_very_negative_r2(tmp_path, monkeypatch):
    seen = {}
    save = plots._save

    def spy(fig, path):
        ax = fig.axes[1]
        seen["ylim"] = ax.get_ylim()
        seen["labels"] = ax.get_legend_handles_labels()[1]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    log = _log(6, metrics=False)
    log["val_r2_macro"] = [-250.0, -3.0, -0.5, 0.2, 0.5, 0.6]
    log["val_pearson_macro"] = [0.1, 0.3, 0.5, 0.7, 0.75, 0.8]
    _assert_png(plot_training_curves(log, tmp_path / "curves.png"))
    assert seen["labels"] == ["R² (macro)", "Pearson r (macro)", "2 values below -1, drawn at it"]
    assert -1.1 < seen["ylim"][0] < -1.0 and seen["ylim"][1] == pytest.approx(1.02)

    log["val_r2_macro"] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # nothing to clip: the usual 0–1 scale, no note
    plot_training_curves(log, tmp_path / "curves.png")
    assert seen["ylim"][0] == pytest.approx(-0.02) and seen["labels"] == ["R² (macro)", "Pearson r (macro)"]


# --- macro averages, calibration, forest ---------------------------------------------------------


def _spy(monkeypatch) -> dict:
    """Capture the first axes' legend labels, title and texts of the next figure saved."""
    seen: dict = {}
    save = plots._save

    def spy(fig, path):
        ax = fig.axes[0]
        seen.update(labels=ax.get_legend_handles_labels()[1], title=ax.get_title(), xlabel=ax.get_xlabel(),
                    texts=[t.get_text() for t in ax.texts], axes=len(fig.axes))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return seen


def _tied(c: int, n: int, seed: int):
    """Noisy predictions rounded to 1 decimal: many tied scores, i.e. vertical/diagonal ROC jumps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = np.round(rng.dirichlet(np.ones(c), n) + 0.4 * np.eye(c)[y], 1) + 0.05
    return y, p / p.sum(1, keepdims=True)  # rows with one rounded vector tie in every column


@pytest.mark.parametrize("c, seed", [(3, 0), (5, 1), (4, 2)])
def test_macro_roc_area_is_sklearns_macro_auroc(c, seed):
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = _tied(c, 150, seed)
    fpr, tpr, area = plots.macro_roc([roc_curve(y == k, p[:, k])[:2] for k in range(c)])
    assert area == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-6)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= -1e-12)  # a proper ROC curve
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("c, seed", [(3, 0), (5, 1)])
def test_macro_pr_area_is_the_mean_average_precision(c, seed):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, p = _tied(c, 150, seed)
    curves = [precision_recall_curve(y == k, p[:, k])[1::-1] for k in range(c)]  # (recall, precision)
    recall, precision, ap = plots.macro_pr(curves)
    assert ap == pytest.approx(np.mean([average_precision_score(y == k, p[:, k]) for k in range(c)]), abs=1e-9)
    assert np.all(np.diff(recall) > 0) and recall[0] == 0 and recall[-1] == 1 and len(precision) == len(recall)


def test_roc_and_pr_legends_carry_the_macro_average(tmp_path, monkeypatch):
    from sklearn.metrics import average_precision_score, roc_auc_score

    seen = _spy(monkeypatch)
    y, p = _predictions(4)
    names = list("abcd")
    plot_roc(y, p, names, tmp_path / "roc.png")
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(4)]
    assert seen["labels"][-2:] == [f"macro (AUC {np.mean(aucs):.3f})", "chance"]
    plot_pr(y, p, names, tmp_path / "pr.png")
    aps = [average_precision_score(y == k, p[:, k]) for k in range(4)]
    assert seen["labels"][-1] == f"macro (AP {np.mean(aps):.3f})"

    y, p = _predictions(2)
    plot_roc(y, p, ["neg", "pos"], tmp_path / "binary.png")  # binary: the positive class only
    assert [label.split(" (")[0] for label in seen["labels"]] == ["pos", "chance"]


def test_multilabel_macro_skips_undefined_labels(tmp_path, monkeypatch):
    from sklearn.metrics import roc_auc_score

    seen = _spy(monkeypatch)
    y, p = _multilabel(labels=4)
    y[:, 3] = np.nan  # never known: no curve, not in the macro
    plot_multilabel_roc(y, p, list("abcd"), tmp_path / "roc.png")
    aucs = [roc_auc_score(*[a[~np.isnan(y[:, i])] for a in (y[:, i], p[:, i])]) for i in range(3)]
    assert f"macro (AUC {np.mean(aucs):.3f})" in seen["labels"]
    assert "d: no rows with a known target, no curve" in seen["labels"]
    plot_multilabel_pr(y[:, :1], p[:, :1], ["a"], tmp_path / "pr.png")  # one label: no macro
    assert not any(label.startswith("macro") for label in seen["labels"])


def test_plot_calibration(tmp_path, monkeypatch):
    from retinafm.stats.calibration import expected_calibration_error

    seen = _spy(monkeypatch)
    y, p = _predictions(3)
    correct = (p.argmax(1) == y).astype(float)
    unknown = np.full(len(y), np.nan)
    path = plots.plot_calibration([("top label", correct, p.max(1)), ("<b>x</b>", unknown, p[:, 0])],
                                  tmp_path / "plots" / "calibration.png")
    _assert_png(path)
    assert seen["title"] == "Calibration (reliability)" and seen["axes"] == 2  # diagram + histogram
    assert seen["labels"] == ["perfectly calibrated",
                              f"top label (ECE {expected_calibration_error(correct, p.max(1)):.3f})",
                              "<b>x</b>: no rows with a known outcome"]
    assert [x.name for x in path.parent.iterdir()] == ["calibration.png"]


def test_plot_forest(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    rows = [
        {"label": "model B vs A — task X", "difference": 0.031, "ci_low": 0.012, "ci_high": 0.05, "p_value": 0.0004},
        {"label": "model C vs A — task X", "difference": -0.01, "ci_low": -0.04, "ci_high": 0.02, "p_value": 0.47},
        {"label": "model D vs A — task Y", "difference": float("nan"), "ci_low": float("nan"),
         "ci_high": float("nan"), "p_value": float("nan")},
    ]
    _assert_png(plots.plot_forest(rows, tmp_path / "forest.png", metric="auroc_macro", reference="A"), min_side=150)
    assert seen["xlabel"] == "difference in auroc_macro (vs A)"
    assert {"p<0.001", "p=0.470", "+0.031 (+0.012, +0.050)", "n/a"} <= set(seen["texts"])
    assert seen["texts"].count("n/a") == 3  # marker, difference and p of the NaN row

    _assert_png(plots.plot_forest([], tmp_path / "empty.png", metric="r2_macro", reference="A"), min_side=100)


def test_probe_grid_and_label_efficiency_plots(tmp_path):
    grid = pd.DataFrame({"C": [1e-3, 1e-2, 0.1, 1.0], "auroc_macro": [0.6, 0.7, 0.8, np.nan],
                         "scheme": "validation"})
    _assert_png(plots.plot_probe_grid(grid, "auroc_macro", tmp_path / "grid.png"))
    summary = pd.DataFrame({"fraction": [0.05, 0.5, 1.0], "n_train": [30, 300, 600], "mean": [0.7, 0.85, np.nan],
                            "sd": [0.05, 0.01, 0.0], "seeds": [3, 3, 1]})
    _assert_png(plots.plot_label_efficiency(summary, "auroc_macro", "RETFound (linear probe)", tmp_path / "le.png"))
