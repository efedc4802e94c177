"""Task types. Each supplies its targets, loss, activation, metrics, plots, prediction columns and
the validation metric that picks the best checkpoint; the training loop is shared."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from retinafm.stats.metrics import grade_order_of
from retinafm.tasks.multiclass import MulticlassTask
from retinafm.tasks.multilabel import MultilabelTask
from retinafm.tasks.regression import RegressionTask

Task = Union[MulticlassTask, MultilabelTask, RegressionTask]
TASKS = {"multiclass": MulticlassTask, "multilabel": MultilabelTask, "regression": RegressionTask}


def make_task(name: str, output_names: Sequence[str], **state: Any) -> Task:
    """A task by name; `state` is a checkpoint's task_state (or the settings of a new run)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](tuple(output_names), **state)


def task_from_config(cfg: Any, output_names: Sequence[str]) -> Task:
    """A new run's task from FinetuneSettings settings (before fit/calibrate)."""
    if cfg.task == "multilabel":
        return MultilabelTask(tuple(output_names), threshold=cfg.threshold_value(), use_pos_weight=cfg.pos_weight)
    if cfg.task == "regression":
        return RegressionTask(tuple(output_names), loss_kind=cfg.loss or "huber", huber_beta=cfg.huber_beta)
    return MulticlassTask(tuple(output_names), grade_order=grade_order(output_names, cfg.ordinal))


def grade_order(class_names: Sequence[str], ordinal: bool) -> Optional[tuple[int, ...]]:
    """Classes named as numbered grades are ordered by their numbers; `ordinal` (--ordinal) also
    marks other names as grades, in their class order. None: nominal classes."""
    order = grade_order_of(class_names)
    if order is None and ordinal and len(class_names) > 2:
        order = list(range(len(class_names)))
    return tuple(order) if order is not None else None
