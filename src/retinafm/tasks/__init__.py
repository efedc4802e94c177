"""Task types. Each supplies its targets, loss, activation, metrics, plots, prediction columns and
the validation metric that picks the best checkpoint; the training loop is shared."""
from __future__ import annotations

from typing import Any, Sequence, Union

from .multiclass import MulticlassTask
from .multilabel import MultilabelTask
from .regression import RegressionTask

Task = Union[MulticlassTask, MultilabelTask, RegressionTask]
TASKS = {"multiclass": MulticlassTask, "multilabel": MultilabelTask, "regression": RegressionTask}


def make_task(name: str, output_names: Sequence[str], **state: Any) -> Task:
    """A task by name; `state` is a checkpoint's task_state (or the settings of a new run)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](tuple(output_names), **state)


def task_from_config(cfg: Any, output_names: Sequence[str]) -> Task:
    """A new run's task from FinetuneConfig settings (before fit/calibrate)."""
    if cfg.task == "multilabel":
        return MultilabelTask(tuple(output_names), threshold=cfg.threshold_value(), use_pos_weight=cfg.pos_weight)
    if cfg.task == "regression":
        return RegressionTask(tuple(output_names), loss_kind=cfg.loss or "huber", huber_beta=cfg.huber_beta)
    return MulticlassTask(tuple(output_names))
