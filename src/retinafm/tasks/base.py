"""What every task type shares: the rule that picks the best epoch, and masked losses.

A task is a frozen dataclass holding its output names plus whatever it learns from data (target
statistics from train, thresholds from validation); `state()` is what the checkpoint keeps so
`predict` rebuilds the identical task from the file alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

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


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list, np.ndarray)):
        return [float(v) if isinstance(v, (float, np.floating)) else v for v in value]
    return value
