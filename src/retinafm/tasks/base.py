"""What every task type shares: the rule that picks the best epoch, and masked losses.

A task is a frozen dataclass holding its output names plus whatever it learns from data (target
statistics from train, thresholds from validation); `state()` is what the checkpoint keeps so
`predict` rebuilds the identical task from the file alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
import torch


class TaskBase:
    """Defaults shared by the task dataclasses (which define `output_names` and `name`)."""

    name: str = ""
    output_names: tuple[str, ...] = ()
    selection_metric: str = "auroc_macro"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.output_names

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def state(self) -> dict[str, Any]:
        """Everything but the output names, as plain types, for the checkpoint's task_state."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in ("output_names", "name")}

    def fit(self, train_targets: np.ndarray) -> "TaskBase":
        """The task with what it learns from the training targets (nothing by default)."""
        return self

    def calibrate(self, targets: np.ndarray, outputs: np.ndarray) -> "TaskBase":
        """The task with what it chooses on validation outputs (nothing by default)."""
        return self

    def bootstrap_strata(self, targets: np.ndarray) -> Optional[np.ndarray]:
        """What bootstrap replicates are stratified on (None: plain resampling)."""
        return None

    # (label, metric key, format) printed after training and evaluation, most important first.
    summary_fields: tuple[tuple[str, str, str], ...] = ()

    def summary(self, metrics: dict[str, float], ci: Optional[dict[str, tuple[float, float]]] = None) -> str:
        """One line of the headline metrics, each with its 95% CI when `ci` has one."""
        parts = []
        for label, key, fmt in self.summary_fields:
            if key not in metrics:
                continue
            text = f"{label} {metrics[key]:{fmt}}"
            low, high = (ci or {}).get(key, (float("nan"), float("nan")))
            if not (np.isnan(low) or np.isnan(high)):
                text += f" ({low:{fmt}}–{high:{fmt}})"
            parts.append(text)
        return "  ".join(parts)

    def is_better(self, metrics: dict[str, float], loss: float, best: dict[str, float] | None,
                  best_loss: float) -> bool:
        """Higher selection metric wins; ties (and epochs where it is undefined) go to the lower loss."""
        if best is None:
            return True
        score = metrics.get(self.selection_metric, float("nan"))
        best_score = best.get(self.selection_metric, float("nan"))
        if np.isnan(best_score) and not np.isnan(score):
            return True
        if np.isnan(score):
            return bool(np.isnan(best_score) and loss < best_loss)
        return score > best_score or (score == best_score and loss < best_loss)


def masked_mean(per_element: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the known entries; zero (still attached to the graph) when none are known."""
    mask = mask.to(per_element.dtype)
    return (per_element * mask).sum() / mask.sum().clamp_min(1.0)


class VectorTargetTask(TaskBase):
    """Tasks whose target is one float per output (0/1 labels or values), NaN where unknown."""

    # Fields holding one float per output; checkpoints give them back as lists.
    per_output_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.per_output_fields:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def target_array(self, samples: Sequence[Any]) -> np.ndarray:
        """(N, outputs) float array of the samples' targets, NaN where unknown."""
        rows = [s.targets if s.targets is not None else (np.nan,) * self.num_outputs for s in samples]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), self.num_outputs)

    def dataset_targets(self, samples: Sequence[Any]) -> list:
        return [tuple(row) for row in self.target_array(samples)]

    @staticmethod
    def columns_of(frame: Any, columns: Sequence[str]) -> np.ndarray:
        """These CSV columns as an (N, len(columns)) float array, empty cells as NaN."""
        require_columns(frame, columns)
        return frame[list(columns)].astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)


def require_columns(frame: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the predictions have no column(s) {missing}; they have {', '.join(map(str, frame.columns))}")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list, np.ndarray)):
        return [float(v) if isinstance(v, (float, np.floating)) else v for v in value]
    return value
