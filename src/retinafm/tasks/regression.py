"""Regression and multi-target regression (age, axial length, HbA1c...): standardised targets,
Huber or MSE loss over the known values, R²-selected.

Targets are standardised with the train split's mean and standard deviation so targets on very
different scales weigh alike in one loss; the statistics live in the checkpoint and outputs are
turned back into original units before anyone sees them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from retinafm.data.sources import DataSourceError, TargetColumns
from retinafm.settings import ConfigError
from retinafm.stats.metrics import regression_metrics
from retinafm.tasks.base import ExplainCase, TaskSetting, VectorTargetTask, masked_mean, numbers, require_columns
from retinafm.tasks.report_cells import ErrorRows, fmt, number_cell

ALPHA_GRID = (1e-3, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # ridge: regularisation strength
LOSSES = ("huber", "mse")
LOSS_MESSAGE = "--loss applies to --task regression and must be 'huber' or 'mse'"


def first_target_quintiles(values: np.ndarray) -> list[int]:
    """What an automatic split stratifies on: quintiles of the first target keep each split's range
    of values similar (-1: unknown)."""
    first = values[:, 0]
    known = ~np.isnan(first)
    edges = np.unique(np.quantile(first[known], [0.2, 0.4, 0.6, 0.8]))
    return [int(np.searchsorted(edges, v)) if k else -1 for v, k in zip(first, known, strict=True)]


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
    mean: tuple[float, ...] | None = None  # train statistics, set by fit()
    std: tuple[float, ...] | None = None

    per_output_fields = ("mean", "std")
    summary_fields = (("macro R²", "r2_macro", ".4f"), ("MAE", "mae_macro", ".4g"), ("RMSE", "rmse_macro", ".4g"),
                      ("Pearson r", "pearson_macro", ".4f"))
    # Manifest: one numeric column per target; the data summary gives each target's mean per split.
    targets = TargetColumns("regression", "--targets", "numeric target", "a number (or empty for unknown)",
                            strata=first_target_quintiles,
                            summarise=lambda grouped: grouped.mean().round(3).rename(columns=lambda c: f"mean_{c}"))
    column_settings = (
        TaskSetting(lambda s: bool(s.targets), "--targets applies to --task regression; for multi-label use --labels"),)
    own_settings = (TaskSetting(lambda s: s.loss is not None, LOSS_MESSAGE),)
    report_headline = ("r2_macro", "mae_macro", "rmse_macro", "pearson_macro")
    output_kind = "target"
    explained_value = "predicted value"
    legacy_marker = "r2_macro"
    probe_grid = ALPHA_GRID[::-1]  # strongest regularisation first
    probe_strength_name = "alpha"
    probe_columns_help = "--targets (the value columns)"

    @classmethod
    def from_settings(cls, settings: Any, output_names: Sequence[str]) -> RegressionTask:
        return cls(tuple(output_names), loss_kind=settings.loss or "huber", huber_beta=settings.huber_beta)

    @classmethod
    def check_own_settings(cls, settings: Any) -> None:
        if settings.loss is not None and settings.loss not in LOSSES:
            raise ConfigError(LOSS_MESSAGE)

    @classmethod
    def search_space(cls, trial: Any, settings: Any) -> dict[str, Any]:
        if (settings.loss or "huber") == "huber":
            return {"huber_beta": trial.suggest_float("huber_beta", 0.5, 2.0)}
        return {}

    def fit(self, train_targets: np.ndarray) -> RegressionTask:
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
                         targets: np.ndarray | None = None) -> pd.DataFrame:
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

    @staticmethod
    def error_rows(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], limit: int) -> ErrorRows:
        """The largest errors; several targets (in different units) are ranked in standard deviations."""
        several = len(outputs) > 1
        found = []
        for name in outputs:
            truth = pd.to_numeric(frame[f"true_{name}"], errors="coerce").to_numpy(dtype=float)
            pred = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
            known = ~np.isnan(truth) & ~np.isnan(pred)
            std = float(np.std(truth[known])) if several and known.sum() > 1 else 1.0
            scale = std if std > 0 else 1.0
            for i in np.flatnonzero(known):
                error = pred[i] - truth[i]
                found.append((abs(error) / scale, i, name, truth[i], pred[i], error))
        found.sort(key=lambda e: -e[0])
        headers = [{"name": "target"}, {"name": "true", "num": True}, {"name": "predicted", "num": True},
                   {"name": "error", "num": True}]
        if several:
            headers.append({"name": "error / SD", "num": True})
        rows = []
        for size, i, name, truth, pred, error in found[:limit]:
            cells = [{"text": name}, number_cell(fmt("value", truth)), number_cell(fmt("value", pred)),
                     number_cell(f"{error:+.4g}")]
            if several:
                cells.append(number_cell(f"{size:.2f}"))
            rows.append((str(frame["path"].iloc[i]), cells))
        ranked = "absolute error in standard deviations of the target" if several else "absolute error"
        note = f"The {len(rows)} largest errors by {ranked}." if rows else "No predictions with a known target."
        return headers, rows, note

    @staticmethod
    def explain_cases(frame: pd.DataFrame, outputs: list[str], metrics: dict[str, Any], n_errors: int = 8,
                      n_correct: int = 8, seed: int = 0) -> list[ExplainCase]:
        """Errors: the largest absolute errors (in standard deviations of the target when there are
        several, as error_rows ranks them); correct: the smallest. The heatmap is that target's.
        Nothing is random here, so `seed` is unused."""
        require_columns(frame, ["path", *(f"true_{n}" for n in outputs), *outputs])
        several = len(outputs) > 1
        found: list[tuple[float, int, int]] = []  # (size of the error, row, target)
        for j, name in enumerate(outputs):
            truth, pred = numbers(frame, f"true_{name}"), numbers(frame, name)
            known = np.isfinite(truth) & np.isfinite(pred)
            std = float(np.std(truth[known])) if several and known.sum() > 1 else 1.0
            scale = std if std > 0 else 1.0
            found += [(abs(pred[i] - truth[i]) / scale, i, j) for i in np.flatnonzero(known)]
        largest = sorted(found, key=lambda e: (-e[0], e[1], e[2]))[:max(0, n_errors)]
        chosen = {(i, j) for _, i, j in largest}  # with few images, an error is never also a "correct" case
        smallest = [e for e in sorted(found, key=lambda e: (e[0], e[1], e[2])) if (e[1], e[2]) not in chosen]
        paths = frame["path"].astype(str).to_numpy()
        return ([ExplainCase(paths[i], outputs[j], "error") for _, i, j in largest]
                + [ExplainCase(paths[i], outputs[j], "correct") for _, i, j in smallest[:max(0, n_correct)]])

    def fit_probe_output(self, j: int, z: np.ndarray, y: np.ndarray, strength: float, max_iter: int,
                         seed: int) -> tuple[np.ndarray, float]:
        """Ridge regression on the standardised target (the task turns outputs back into units)."""
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=strength).fit(z, (y - self.mean[j]) / self.std[j])
        return model.coef_, float(model.intercept_)

    def knn_output(self, x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
        from sklearn.neighbors import KNeighborsRegressor

        return KNeighborsRegressor(n_neighbors=k, metric="cosine").fit(x_train, y_train).predict(x)
