"""Figures people would rather see than read: confusion matrix, ROC, PR, training curves.

Each function saves one PNG atomically (temporary file in the same folder, then rename), closes
its figure and returns the path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from ..files import atomic_path  # noqa: E402

DPI = 120
# Validation metrics drawn in the training-curves figure, in this order, when the log has them.
CURVE_METRICS = {"val_auroc_macro": "AUROC (macro)", "val_accuracy": "accuracy", "val_kappa": "kappa"}


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, normalize: bool = False) -> Path:
    """Annotated heatmap of `cm` (rows: true, columns: predicted); `normalize` shows row fractions."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 1.0 * n + 2.5))
    vmax = 1.0 if normalize else max(float(shown.max(initial=0)), 1.0)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="True",
           title="Confusion matrix" + (" (row-normalised)" if normalize else ""))
    ax.set_xticklabels(class_names, rotation=30, ha="right")
    ax.set_yticklabels(class_names)
    for i in range(n):
        for j in range(n):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if shown[i, j] > vmax / 2 else "black")
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """One-vs-rest ROC curve per class (binary: the positive class) with its AUC, and the chance line."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, positive, scores in _one_vs_rest(ax, y_true, probs, class_names):
        fpr, tpr, _ = roc_curve(positive, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, scores):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)",
           title="ROC (one vs rest)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """One-vs-rest precision–recall curve per class (binary: the positive class) with its average precision."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, positive, scores in _one_vs_rest(ax, y_true, probs, class_names):
        precision, recall, _ = precision_recall_curve(positive, scores)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(positive, scores):.3f})")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title="Precision–recall (one vs rest)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_training_curves(log: pd.DataFrame, path: Path) -> Path:
    """Three panels from a run's log (`epoch` 0-based, `lr`, `train_loss`, `val_loss`, `val_*`):
    losses, validation AUROC/accuracy/kappa (those present) and learning rate, per epoch."""
    epochs = log["epoch"].to_numpy() + 1
    marker = "o" if len(log) < 30 else None
    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8), sharex=True)

    for column, label in (("train_loss", "train"), ("val_loss", "validation")):
        if column in log:
            loss_ax.plot(epochs, log[column], marker=marker, label=label)
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="loss")

    shown = [c for c in CURVE_METRICS if c in log]
    for column in shown:
        metric_ax.plot(epochs, log[column], marker=marker, label=CURVE_METRICS[column])
    # Kappa can go below 0; otherwise keep the familiar 0–1 scale.
    lowest = float(np.nanmin(log[shown].to_numpy(dtype=float), initial=0.0)) if shown else 0.0
    metric_ax.set(title="Validation", xlabel="epoch", ylim=(min(0.0, lowest) - 0.02, 1.02))
    if not shown:
        metric_ax.text(0.5, 0.5, "no validation metrics logged", ha="center", va="center",
                       transform=metric_ax.transAxes, color="grey")

    if "lr" in log:
        lr_ax.plot(epochs, log["lr"], marker=marker)
    lr_ax.set(title="Learning rate", xlabel="epoch", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    for ax in (loss_ax, metric_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # matplotlib's ±5% margin around one point leaves no integer tick
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _one_vs_rest(ax: plt.Axes, y_true: np.ndarray, probs: np.ndarray,
                 class_names: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, positives, scores) per class (binary: the positive class only). A class whose curve
    is undefined in this set gets a legend entry saying so instead of a curve."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    for c in [1] if len(class_names) == 2 else range(len(class_names)):
        positive = y_true == c
        if positive.any() and not positive.all():
            yield class_names[c], positive, probs[:, c]
        else:
            missing = "no negatives" if positive.all() else "no positives"
            ax.plot([], [], " ", label=f"{class_names[c]}: {missing}, no curve")


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
