"""Multi-class (and binary) classification: softmax head, cross-entropy, AUROC-selected."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from retinafm.stats.metrics import confusion, multiclass_metrics
from retinafm.tasks.base import TaskBase, require_columns


@dataclass(frozen=True)
class MulticlassTask(TaskBase):
    output_names: tuple[str, ...]
    name: str = "multiclass"
    # Best epoch: highest validation macro AUROC (binary: the positive class's); ties go to the lower loss.
    selection_metric: str = "auroc_macro"
    # Ordered grades (e.g. DR 0-4): class indices from the lowest grade to the highest; None: nominal.
    grade_order: Optional[tuple[int, ...]] = None

    summary_fields = (("AUROC", "auroc_macro", ".4f"), ("accuracy", "accuracy", ".4f"), ("F1", "f1_macro", ".4f"),
                      ("quadratic kappa", "quadratic_kappa", ".4f"), ("kappa", "kappa", ".4f"), ("MCC", "mcc", ".4f"))

    def __post_init__(self) -> None:
        if self.grade_order is not None:  # checkpoints give it back as a list
            object.__setattr__(self, "grade_order", tuple(int(i) for i in self.grade_order))

    @property
    def ordinal(self) -> bool:
        return self.grade_order is not None

    def bootstrap_strata(self, targets: np.ndarray) -> np.ndarray:
        """Resample within each class, so every replicate keeps the class counts."""
        return np.asarray(targets)

    def target_array(self, samples: Sequence) -> np.ndarray:
        return np.array([s.label for s in samples], dtype=np.int64)

    def dataset_targets(self, samples: Sequence) -> list:
        return [s.label for s in samples]

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        # With mixup/cutmix the targets arrive already mixed and smoothed.
        return SoftTargetCrossEntropy() if soft_targets else nn.CrossEntropyLoss(label_smoothing=smoothing)

    def loss(self, logits: torch.Tensor, targets: np.ndarray) -> float:
        return float(nn.functional.cross_entropy(logits.float(), torch.as_tensor(targets, dtype=torch.long)))

    def activate(self, logits: torch.Tensor) -> np.ndarray:
        return torch.softmax(logits.float(), dim=1).numpy()

    def metrics(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return multiclass_metrics(targets, probs, self.output_names, self.grade_order)

    def predicted_labels(self, probs: np.ndarray) -> list[str]:
        return [self.output_names[i] for i in probs.argmax(axis=1)]

    def prediction_frame(self, paths: Sequence[str], probs: np.ndarray,
                         targets: Optional[np.ndarray] = None) -> pd.DataFrame:
        """path, prediction, [label], then one prob_<class> per class (rows sum to 1)."""
        frame = pd.DataFrame({"path": list(paths), "prediction": self.predicted_labels(probs)})
        if targets is not None:
            frame["label"] = [self.output_names[int(t)] for t in targets]
        for i, name in enumerate(self.output_names):
            frame[f"prob_{name}"] = probs[:, i]
        return frame

    def from_prediction_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(targets, probabilities) back from an evaluation's predictions CSV (`label`, prob_<class>)."""
        require_columns(frame, ["label", *(f"prob_{n}" for n in self.output_names)])
        index = {name: i for i, name in enumerate(self.output_names)}
        unknown = sorted(set(frame["label"].astype(str)) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the classes {list(self.output_names)}")
        targets = np.array([index[str(v)] for v in frame["label"]], dtype=np.int64)
        return targets, frame[[f"prob_{n}" for n in self.output_names]].to_numpy(dtype=np.float64)

    def plots(self, targets: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
        # matplotlib loads only when a plot is drawn: predict and embed never pay its ~0.7 s import.
        from retinafm.plots import (
            plot_calibration,
            plot_confusion_matrix,
            plot_pr,
            plot_roc,
        )

        cm = confusion(targets, probs.argmax(axis=1), self.num_outputs)
        # Top-label reliability: is the model right as often as its confidence says?
        correct = (probs.argmax(axis=1) == np.asarray(targets)).astype(float)
        return {
            "confusion_matrix": plot_confusion_matrix(cm, self.output_names, folder / "confusion_matrix.png"),
            "confusion_matrix_normalized": plot_confusion_matrix(
                cm, self.output_names, folder / "confusion_matrix_normalized.png", normalize=True),
            "roc": plot_roc(targets, probs, self.output_names, folder / "roc.png"),
            "pr": plot_pr(targets, probs, self.output_names, folder / "pr.png"),
            "calibration": plot_calibration([("top label", correct, probs.max(axis=1))], folder / "calibration.png"),
        }
