"""Multi-label classification (several findings per image): sigmoid outputs, masked BCE.

Each label is its own binary problem; an empty cell in the manifest means "unknown for this
image" and is left out of that label's loss and metrics. Decisions use a fixed threshold or
per-label thresholds chosen on validation by Youden's J, kept in the checkpoint for `predict`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from retinafm.data.splits import rarest_positive
from retinafm.stats.metrics import (
    _known,
    multilabel_confusion,
    multilabel_metrics,
    youden_thresholds,
)
from retinafm.tasks.base import VectorTargetTask, masked_mean


class MaskedBCEWithLogits(nn.Module):
    """BCE over the known (non-NaN) targets only, with optional per-label positive weights and
    label smoothing towards 0.5."""

    def __init__(self, pos_weight: Optional[Sequence[float]] = None, smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        y = torch.nan_to_num(targets.float(), nan=0.0)
        if self.smoothing:
            y = y * (1.0 - self.smoothing) + 0.5 * self.smoothing
        per_element = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), y, pos_weight=self.pos_weight, reduction="none")
        return masked_mean(per_element, known)


@dataclass(frozen=True)
class MultilabelTask(VectorTargetTask):
    output_names: tuple[str, ...]
    name: str = "multilabel"
    selection_metric: str = "auroc_macro"
    threshold: Optional[float] = 0.5  # None: per-label thresholds chosen on validation (Youden's J)
    thresholds: Optional[tuple[float, ...]] = None  # the ones in use; None until calibrated
    use_pos_weight: bool = False
    pos_weight: Optional[tuple[float, ...]] = None  # negatives/positives per label in train

    per_output_fields = ("thresholds", "pos_weight")
    summary_fields = (("macro AUROC", "auroc_macro", ".4f"), ("AUPRC", "auprc_macro", ".4f"), ("F1", "f1_macro", ".4f"),
                      ("sensitivity", "sensitivity_macro", ".4f"), ("specificity", "specificity_macro", ".4f"))

    @property
    def decision_thresholds(self) -> list[float]:
        if self.thresholds is not None:
            return list(self.thresholds)
        return [0.5 if self.threshold is None else float(self.threshold)] * self.num_outputs

    def fit(self, train_targets: np.ndarray) -> "MultilabelTask":
        positives = np.nansum(train_targets, axis=0)
        negatives = np.sum(train_targets == 0, axis=0)
        for name, pos, neg in zip(self.output_names, positives, negatives):
            if pos == 0 or neg == 0:
                warnings.warn(f"label {name!r} has no {'positive' if pos == 0 else 'negative'} training images; "
                              "the model cannot learn it", UserWarning, stacklevel=2)
        if not self.use_pos_weight:
            return self
        # BCE's pos_weight: each positive counts as negatives/positives of them, balancing rare findings.
        weights = tuple(float(n / p) if p > 0 and n > 0 else 1.0 for p, n in zip(positives, negatives))
        return replace(self, pos_weight=weights)

    def bootstrap_strata(self, targets: np.ndarray) -> np.ndarray:
        """Each row's rarest positive label (-1: none), as the automatic split stratifies: every
        replicate then keeps positives of each finding, however rare."""
        return rarest_positive(targets)

    def calibrate(self, targets: np.ndarray, probs: np.ndarray) -> "MultilabelTask":
        if self.threshold is not None:
            return self
        return replace(self, thresholds=tuple(youden_thresholds(targets, probs, self.output_names)))

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        return MaskedBCEWithLogits(self.pos_weight, smoothing)

    def loss(self, logits: torch.Tensor, targets: np.ndarray) -> float:
        return float(MaskedBCEWithLogits()(logits, torch.as_tensor(targets, dtype=torch.float32)))

    def activate(self, logits: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(logits.float()).numpy()

    def metrics(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return multilabel_metrics(targets, probs, self.output_names, self.decision_thresholds)

    def predicted_labels(self, probs: np.ndarray) -> list[str]:
        positive = probs >= np.asarray(self.decision_thresholds)
        return [";".join(n for n, p in zip(self.output_names, row) if p) for row in positive]

    def prediction_frame(self, paths: Sequence[str], probs: np.ndarray,
                         targets: Optional[np.ndarray] = None) -> pd.DataFrame:
        """path, prediction (labels at or above their threshold, joined by ';'), [true_<label>
        (0/1, empty if unknown)], then one independent prob_<label> per label."""
        frame = pd.DataFrame({"path": list(paths), "prediction": self.predicted_labels(probs)})
        if targets is not None:
            for i, name in enumerate(self.output_names):
                frame[f"true_{name}"] = pd.array(np.where(np.isnan(targets[:, i]), None, targets[:, i]), dtype="Int64")
        for i, name in enumerate(self.output_names):
            frame[f"prob_{name}"] = probs[:, i]
        return frame

    def from_prediction_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(targets, probabilities) back from an evaluation's predictions CSV (true_<label>, prob_<label>)."""
        return (self.columns_of(frame, [f"true_{n}" for n in self.output_names]),
                self.columns_of(frame, [f"prob_{n}" for n in self.output_names]))

    def plots(self, targets: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
        # matplotlib loads only when a plot is drawn: predict and embed never pay its ~0.7 s import.
        from retinafm.plots import (
            plot_calibration,
            plot_multilabel_confusion,
            plot_multilabel_pr,
            plot_multilabel_roc,
        )

        cms = multilabel_confusion(targets, probs, self.decision_thresholds)
        return {
            "confusion_matrix": plot_multilabel_confusion(cms, self.output_names, folder / "confusion_matrix.png"),
            "roc": plot_multilabel_roc(targets, probs, self.output_names, folder / "roc.png"),
            "pr": plot_multilabel_pr(targets, probs, self.output_names, folder / "pr.png"),
            "calibration": plot_calibration(
                [(name, *_known(targets, probs, i)) for i, name in enumerate(self.output_names)],
                folder / "calibration.png"),
        }
