"""Regression and multi-target regression (age, axial length, HbA1c...): standardised targets,
Huber or MSE loss over the known values, R²-selected.

Targets are standardised with the train split's mean and standard deviation so targets on very
different scales weigh alike in one loss; the statistics live in the checkpoint and outputs are
turned back into original units before anyone sees them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from retinafm.data.sources import DataSourceError
from retinafm.stats.metrics import regression_metrics
from retinafm.tasks.base import VectorTargetTask, masked_mean


class MaskedRegressionLoss(nn.Module):
    """Huber (SmoothL1 with `beta`) or MSE on standardised targets, over the known values only:
    a row missing one target still trains the others."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], kind: str = "huber", beta: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.kind, self.beta = kind, beta

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        z = torch.nan_to_num((targets.float() - self.mean) / self.std, nan=0.0)
        if self.kind == "mse":
            per_element = nn.functional.mse_loss(outputs.float(), z, reduction="none")
        else:
            per_element = nn.functional.smooth_l1_loss(outputs.float(), z, beta=self.beta, reduction="none")
        return masked_mean(per_element, known)


@dataclass(frozen=True)
class RegressionTask(VectorTargetTask):
    output_names: tuple[str, ...]
    name: str = "regression"
    # Best epoch: highest validation macro R² (mean over targets); ties go to the lower loss.
    selection_metric: str = "r2_macro"
    loss_kind: str = "huber"
    huber_beta: float = 1.0
    mean: Optional[tuple[float, ...]] = None  # train statistics, set by fit()
    std: Optional[tuple[float, ...]] = None

    per_output_fields = ("mean", "std")
    summary_fields = (("macro R²", "r2_macro", ".4f"), ("MAE", "mae_macro", ".4g"), ("RMSE", "rmse_macro", ".4g"),
                      ("Pearson r", "pearson_macro", ".4f"))

    def fit(self, train_targets: np.ndarray) -> "RegressionTask":
        mean, std = [], []
        for i, name in enumerate(self.output_names):
            known = train_targets[:, i][~np.isnan(train_targets[:, i])]
            if len(known) < 2 or float(np.std(known)) == 0.0:
                raise DataSourceError(
                    f"target {name!r} has {len(known)} known training value(s)"
                    f"{' all equal' if len(known) >= 2 else ''}; a regression target needs at least two "
                    "different training values")
            mean.append(float(np.mean(known)))
            std.append(float(np.std(known)))
        return replace(self, mean=tuple(mean), std=tuple(std))

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.std is None:
            raise RuntimeError("regression task used before fit(): the train statistics are unknown")
        return np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)

    def train_loss(self, smoothing: float = 0.0, soft_targets: bool = False) -> nn.Module:
        mean, std = self._stats()
        return MaskedRegressionLoss(mean.tolist(), std.tolist(), self.loss_kind, self.huber_beta)

    def loss(self, outputs: torch.Tensor, targets: np.ndarray) -> float:
        return float(self.train_loss()(outputs, torch.as_tensor(targets, dtype=torch.float32)))

    def activate(self, outputs: torch.Tensor) -> np.ndarray:
        """Network outputs (standardised) → predictions in the targets' original units."""
        mean, std = self._stats()
        return outputs.float().numpy() * std + mean

    def metrics(self, targets: np.ndarray, preds: np.ndarray) -> dict[str, float]:
        return regression_metrics(targets, preds, self.output_names)

    def prediction_frame(self, paths: Sequence[str], preds: np.ndarray,
                         targets: Optional[np.ndarray] = None) -> pd.DataFrame:
        """path, [true_<target> (empty if unknown)], then one column per target, in original units."""
        frame = pd.DataFrame({"path": list(paths)})
        if targets is not None:
            for i, name in enumerate(self.output_names):
                frame[f"true_{name}"] = targets[:, i]
        for i, name in enumerate(self.output_names):
            frame[name] = preds[:, i]
        return frame

    def from_prediction_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(targets, predictions) back from an evaluation's predictions CSV (true_<target>, <target>)."""
        return (self.columns_of(frame, [f"true_{n}" for n in self.output_names]),
                self.columns_of(frame, list(self.output_names)))

    def plots(self, targets: np.ndarray, preds: np.ndarray, folder: Path) -> dict[str, Path]:
        # matplotlib loads only when a plot is drawn: predict and embed never pay its ~0.7 s import.
        from retinafm.plots import plot_regression_scatter

        return {"scatter": plot_regression_scatter(targets, preds, self.output_names, folder / "scatter.png")}
