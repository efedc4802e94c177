"""Figures people would rather see than read: confusion matrix, ROC, PR, training curves.

Each function saves one PNG atomically and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from ..files import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, normalize: bool = False) -> Path:
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 2))
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted", ylabel="True",
           title="Confusion matrix" + (" (row-normalised)" if normalize else ""))
    ax.set_xticklabels(class_names, rotation=30, ha="right")
    ax.set_yticklabels(class_names)
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(n):
        for j in range(n):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", color="white" if shown[i, j] > threshold else "black")
    return _save(fig, path)


def _one_vs_rest(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]):
    """(name, positives, scores) per class with both outcomes present; binary: the positive class."""
    indices = [1] if len(class_names) == 2 else range(len(class_names))
    for c in indices:
        positive = np.asarray(y_true) == c
        if positive.any() and not positive.all():
            yield class_names[c], positive, np.asarray(probs)[:, c]


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, positive, scores in _one_vs_rest(y_true, probs, class_names):
        fpr, tpr, _ = roc_curve(positive, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, scores):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set(xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)",
           title="ROC (one vs rest)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, positive, scores in _one_vs_rest(y_true, probs, class_names):
        precision, recall, _ = precision_recall_curve(positive, scores)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(positive, scores):.3f})")
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)", title="Precision–recall (one vs rest)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_training_curves(log: pd.DataFrame, path: Path) -> Path:
    """Loss, validation metrics and learning rate per epoch, from a run's log.csv."""
    epochs = log["epoch"] + 1
    marker = "o" if len(log) < 30 else None
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(epochs, log["train_loss"], marker=marker, label="train")
    axes[0].plot(epochs, log["val_loss"], marker=marker, label="validation")
    axes[0].set(title="Loss", xlabel="epoch")
    axes[0].legend()
    labels = {"val_auroc_macro": "AUROC (macro)", "val_accuracy": "accuracy", "val_kappa": "kappa"}
    shown = [c for c in labels if c in log]
    for column in shown:
        axes[1].plot(epochs, log[column], marker=marker, label=labels[column])
    lowest = float(np.nanmin(log[shown].to_numpy(dtype=float), initial=0.0)) if shown else 0.0
    axes[1].set(title="Validation", xlabel="epoch", ylim=(min(0.0, lowest), 1.02))
    axes[1].legend(loc="lower right")
    axes[2].plot(epochs, log["lr"], marker=marker)
    axes[2].set(title="Learning rate", xlabel="epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    return _save(fig, path)
