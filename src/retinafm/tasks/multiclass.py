"""Multi-class (and binary) classification: softmax head, cross-entropy, AUROC-selected."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from ..evaluate.metrics import multiclass_metrics


@dataclass(frozen=True)
class MulticlassTask:
    class_names: tuple[str, ...]
    name: str = "multiclass"
    # Best epoch: highest validation macro AUROC; ties go to the lower validation loss.
    selection_metric: str = "auroc_macro"

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        # With mixup/cutmix the targets arrive already mixed and smoothed.
        return SoftTargetCrossEntropy() if soft_targets else nn.CrossEntropyLoss(label_smoothing=smoothing)

    def eval_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def metrics(self, targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        return multiclass_metrics(targets, probs, self.class_names)

    def predicted_labels(self, probs: np.ndarray) -> list[str]:
        return [self.class_names[i] for i in probs.argmax(axis=1)]

    def is_better(self, metrics: dict[str, float], loss: float, best: dict[str, float] | None, best_loss: float) -> bool:
        if best is None:
            return True
        score, best_score = metrics.get(self.selection_metric, float("nan")), best.get(self.selection_metric, float("nan"))
        if np.isnan(best_score) and not np.isnan(score):
            return True
        if np.isnan(score):
            return bool(np.isnan(best_score) and loss < best_loss)
        return score > best_score or (score == best_score and loss < best_loss)

    def prediction_frame(self, paths, probs: np.ndarray, targets: np.ndarray | None = None):
        """Predictions CSV layout: path, prediction, [label], then one prob_<class> per class."""
        import pandas as pd

        frame = pd.DataFrame({"path": list(paths), "prediction": self.predicted_labels(probs)})
        if targets is not None:
            frame["label"] = [self.class_names[int(t)] for t in targets]
        for i, name in enumerate(self.class_names):
            frame[f"prob_{name}"] = probs[:, i]
        return frame
