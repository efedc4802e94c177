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

from ..evaluate.metrics import confusion, multiclass_metrics
from ..evaluate.plots import plot_confusion_matrix, plot_pr, plot_roc
from .base import TaskBase


@dataclass(frozen=True)
class MulticlassTask(TaskBase):
    output_names: tuple[str, ...]
    name: str = "multiclass"
    # Best epoch: highest validation macro AUROC (binary: the positive class's); ties go to the lower loss.
    selection_metric: str = "auroc_macro"

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
        return multiclass_metrics(targets, probs, self.output_names)

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

    def plots(self, targets: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
        cm = confusion(targets, probs.argmax(axis=1), self.num_outputs)
        return {
            "confusion_matrix": plot_confusion_matrix(cm, self.output_names, folder / "confusion_matrix.png"),
            "roc": plot_roc(targets, probs, self.output_names, folder / "roc.png"),
            "pr": plot_pr(targets, probs, self.output_names, folder / "pr.png"),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return (f"AUROC {metrics['auroc_macro']:.4f}  accuracy {metrics['accuracy']:.4f}  "
                f"F1 {metrics['f1_macro']:.4f}  kappa {metrics['kappa']:.4f}  MCC {metrics['mcc']:.4f}")
