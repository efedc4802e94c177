"""Multi-label classification (several findings per image): sigmoid outputs, masked BCE.

Each label is its own binary problem; an empty cell in the manifest means "unknown for this
image" and is left out of that label's loss and metrics. Decisions use a fixed threshold or
per-label thresholds chosen on validation by Youden's J, kept in the checkpoint for `predict`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from retinafm.data.sources import DataSourceError, TargetColumns
from retinafm.data.splits import rarest_positive
from retinafm.stats.metrics import (
    _known,
    multilabel_confusion,
    multilabel_metrics,
    youden_thresholds,
)
from retinafm.tasks.base import (
    ExplainCase,
    TaskSetting,
    VectorTargetTask,
    logistic_probe,
    logit,
    masked_mean,
    numbers,
    require_columns,
    sample_in_order,
)
from retinafm.tasks.report_cells import ErrorRows, fmt, number_cell


class MaskedBCEWithLogits(nn.Module):
    """BCE over the known (non-NaN) targets only, with optional per-label positive weights and
    label smoothing towards 0.5."""

    def __init__(self, pos_weight: Sequence[float] | None = None, smoothing: float = 0.0) -> None:
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
    threshold: float | None = 0.5  # None: per-label thresholds chosen on validation (Youden's J)
    thresholds: tuple[float, ...] | None = None  # the ones in use; None until calibrated
    use_pos_weight: bool = False
    pos_weight: tuple[float, ...] | None = None  # negatives/positives per label in train

    per_output_fields = ("thresholds", "pos_weight")
    summary_fields = (("macro AUROC", "auroc_macro", ".4f"), ("AUPRC", "auprc_macro", ".4f"), ("F1", "f1_macro", ".4f"),
                      ("sensitivity", "sensitivity_macro", ".4f"), ("specificity", "specificity_macro", ".4f"))
    # Manifest: one 0/1 column per label; an automatic split keeps positives of every label in each split.
    targets = TargetColumns("multilabel", "--labels", "0/1 label", "0 or 1 (or empty for unknown)",
                            strata=lambda values: rarest_positive(values).tolist(),
                            summarise=lambda grouped: grouped.sum().astype(int), allowed=(0, 1))
    column_settings = (
        TaskSetting(lambda s: bool(s.labels), "--labels applies to --task multilabel; for regression use --targets"),)
    own_settings = (
        TaskSetting(lambda s: bool(s.pos_weight), "--pos-weight applies to --task multilabel"),
        TaskSetting(lambda s: str(s.threshold) != "0.5", "--threshold applies to --task multilabel"),
    )
    report_headline = ("auroc_macro", "auprc_macro", "accuracy_macro", "sensitivity_macro", "specificity_macro",
                       "f1_macro", "kappa_macro", "ece_macro")
    output_kind = "label"
    probe_columns_help = "--labels (the 0/1 label columns)"
    legacy_marker = "accuracy_macro"

    @classmethod
    def from_settings(cls, settings: Any, output_names: Sequence[str]) -> MultilabelTask:
        return cls(tuple(output_names), threshold=settings.threshold_value(), use_pos_weight=settings.pos_weight)

    @property
    def decision_thresholds(self) -> list[float]:
        if self.thresholds is not None:
            return list(self.thresholds)
        return [0.5 if self.threshold is None else float(self.threshold)] * self.num_outputs

    def fit(self, train_targets: np.ndarray) -> MultilabelTask:
        positives = np.nansum(train_targets, axis=0)
        negatives = np.sum(train_targets == 0, axis=0)
        for name, pos, neg in zip(self.output_names, positives, negatives, strict=True):
            if pos == 0 or neg == 0:
                warnings.warn(f"label {name!r} has no {'positive' if pos == 0 else 'negative'} training images; "
                              "the model cannot learn it", UserWarning, stacklevel=2)
        if not self.use_pos_weight:
            return self
        # BCE's pos_weight: each positive counts as negatives/positives of them, balancing rare findings.
        weights = tuple(float(n / p) if p > 0 and n > 0 else 1.0 for p, n in zip(positives, negatives, strict=True))
        return replace(self, pos_weight=weights)

    def bootstrap_strata(self, targets: np.ndarray) -> np.ndarray:
        """Each row's rarest positive label (-1: none), as the automatic split stratifies: every
        replicate then keeps positives of each finding, however rare."""
        return rarest_positive(targets)

    def calibrate(self, targets: np.ndarray, probs: np.ndarray) -> MultilabelTask:
        if self.threshold is not None:
            return self
        return replace(self, thresholds=tuple(youden_thresholds(targets, probs, self.output_names)))

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        return MaskedBCEWithLogits(self.pos_weight, smoothing)

    def loss(self, logits: torch.Tensor, targets: np.ndarray) -> float:
        return float(MaskedBCEWithLogits()(logits, torch.as_tensor(targets, dtype=torch.float32)))

    def activate(self, logits: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(logits.float()).numpy()

    def explained_outputs(self, probs: np.ndarray) -> list[list[int]]:
        """What `--target predicted` explains per image: each label at or above its threshold, or the most
        probable label when none is (an image without a map would leave the reader guessing)."""
        positive = probs >= np.asarray(self.decision_thresholds)
        return [np.flatnonzero(row).tolist() or [int(p.argmax())] for row, p in zip(positive, probs, strict=True)]

    def metrics(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return multilabel_metrics(targets, probs, self.output_names, self.decision_thresholds)

    def predicted_labels(self, probs: np.ndarray) -> list[str]:
        positive = probs >= np.asarray(self.decision_thresholds)
        return [";".join(n for n, p in zip(self.output_names, row, strict=True) if p) for row in positive]

    def prediction_frame(self, paths: Sequence[str], probs: np.ndarray,
                         targets: np.ndarray | None = None) -> pd.DataFrame:
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

    @staticmethod
    def error_rows(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], limit: int) -> ErrorRows:
        """The wrong (image, label) decisions among the known labels, furthest from the truth first."""
        thresholds = _thresholds(metrics, len(outputs))
        found = []
        for name, cut in zip(outputs, thresholds, strict=True):
            truth = pd.to_numeric(frame[f"true_{name}"], errors="coerce").to_numpy(dtype=float)
            prob = pd.to_numeric(frame[f"prob_{name}"], errors="coerce").to_numpy(dtype=float)
            for i in np.flatnonzero(~np.isnan(truth) & ((prob >= cut) != (truth == 1))):
                found.append((abs(prob[i] - truth[i]), i, name, truth[i], prob[i], cut))
        found.sort(key=lambda e: -e[0])  # stable: ties keep row then label order
        headers = [{"name": "label"}, {"name": "truth"}, {"name": "probability", "num": True},
                   {"name": "threshold", "num": True}]
        rows = [(str(frame["path"].iloc[i]), [{"text": name}, {"text": "present" if truth == 1 else "absent"},
                                              number_cell(fmt("p", prob)), number_cell(fmt("p", cut))])
                for _, i, name, truth, prob, cut in found[:limit]]
        note = (f"{len(found)} wrong (image, label) decisions among the known labels; the {len(rows)} furthest from "
                "the truth are shown." if found else "No wrong decisions among the known labels.")
        return headers, rows, note

    @staticmethod
    def explain_cases(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], n_errors: int = 8,
                      n_correct: int = 8, seed: int = 0) -> list[ExplainCase]:
        """Errors: the wrong (image, label) decisions at the saved thresholds, furthest from the
        threshold first; correct: a seeded sample of the rightly found labels (true positives), or of
        the rightly absent ones when no label was found. The heatmap is that label's."""
        require_columns(frame, ["path", *(f"true_{n}" for n in outputs), *(f"prob_{n}" for n in outputs)])
        thresholds = _thresholds(metrics, len(outputs))
        wrong: list[tuple[float, int, int]] = []  # (distance from the threshold, row, label)
        positives: list[tuple[int, int]] = []
        negatives: list[tuple[int, int]] = []
        for j, (name, cut) in enumerate(zip(outputs, thresholds, strict=True)):
            truth, prob = numbers(frame, f"true_{name}"), numbers(frame, f"prob_{name}")
            known = np.isin(truth, (0.0, 1.0)) & ~np.isnan(prob)  # only a 0/1 truth can be right or wrong
            said = prob >= cut
            wrong += [(abs(prob[i] - cut), i, j) for i in np.flatnonzero(known & (said != (truth == 1)))]
            positives += [(i, j) for i in np.flatnonzero(known & said & (truth == 1))]
            negatives += [(i, j) for i in np.flatnonzero(known & ~said & (truth == 0))]
        wrong.sort(key=lambda e: (-e[0], e[1], e[2]))  # ties: CSV order, then label order
        right = sorted(positives or negatives)
        right = [right[k] for k in sample_in_order(len(right), n_correct, seed)]
        paths = frame["path"].astype(str).to_numpy()
        return ([ExplainCase(paths[i], outputs[j], "error") for _, i, j in wrong[:max(0, n_errors)]]
                + [ExplainCase(paths[i], outputs[j], "correct") for i, j in right])

    def roc_curves(self, targets: np.ndarray, outputs_a: np.ndarray, outputs_b: np.ndarray):
        for i, name in enumerate(self.output_names):
            known = ~np.isnan(targets[:, i])
            yield name, targets[known, i].astype(int), outputs_a[known, i], outputs_b[known, i]

    @classmethod
    def check_probe_values(cls, columns: list[str], targets: np.ndarray) -> None:
        bad = sorted(set(np.unique(targets[~np.isnan(targets)])) - {0.0, 1.0})
        if bad:
            raise DataSourceError(f"multi-label columns {columns} must hold 0 or 1 (or empty), found {bad[:5]}")

    @classmethod
    def for_probe(cls, columns: Sequence[str], settings: Any) -> MultilabelTask:
        return cls(tuple(columns), threshold=settings.threshold)

    def fit_probe_output(self, j: int, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int,
                         seed: int) -> tuple[np.ndarray, float]:
        """One logistic regression per label."""
        if len(np.unique(y)) < 2:  # no positives (or negatives): predict the training prevalence
            prevalence = float(np.clip(y.mean() if len(y) else 0.5, 1e-4, 1 - 1e-4))
            return np.zeros(z.shape[1]), logit(prevalence)
        model = logistic_probe(z, y, strength, max_iter, seed)
        return model.coef_[0], float(model.intercept_[0])

    def knn_output(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        from sklearn.neighbors import KNeighborsClassifier

        if len(np.unique(y_train)) < 2:
            return np.full(len(x), y_train.mean() if len(y_train) else 0.5)
        model = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x_train, y_train)
        return model.predict_proba(x)[:, list(model.classes_).index(1.0)]


def _thresholds(metrics: dict[str, Any], count: int) -> list[float]:
    """The multi-label decision thresholds the predictions were made with."""
    state = (metrics.get("task") or {}).get("state") or {}
    if state.get("thresholds") is not None and len(state["thresholds"]) == count:
        return [float(t) for t in state["thresholds"]]
    threshold = state.get("threshold")
    try:
        return [float(threshold)] * count if threshold is not None else [0.5] * count
    except (TypeError, ValueError):  # e.g. "youden" without calibrated thresholds
        return [0.5] * count
