"""Task types. Each supplies its targets, loss, activation, metrics, plots, prediction columns and
the validation metric that picks the best checkpoint, plus what the rest of the toolkit asks of a
task type (its manifest reader, settings checks, report headline and error rows, linear probe);
the training loop is shared.

`TASKS` is the one list of task types: a new type is one file here plus one line in it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retinafm.settings import ConfigError
from retinafm.tasks.base import ExplainCase, TaskBase
from retinafm.tasks.multiclass import MulticlassTask, grade_order
from retinafm.tasks.multilabel import MultilabelTask
from retinafm.tasks.regression import RegressionTask

Task = MulticlassTask | MultilabelTask | RegressionTask
TASKS: dict[str, type[TaskBase]] = {
    "multiclass": MulticlassTask,
    "multilabel": MultilabelTask,
    "regression": RegressionTask,
}
DEFAULT_TASK = "multiclass"  # FinetuneSettings.task's default; older files without a task name are this

__all__ = ["DEFAULT_TASK", "TASKS", "ExplainCase", "MulticlassTask", "MultilabelTask", "RegressionTask", "Task",
           "TaskBase", "check_settings", "get_task", "grade_order", "make_task", "task_from_config"]


def get_task(name: str) -> type[TaskBase]:
    """The task type called `name` (--task), or a ConfigError listing the ones there are."""
    if name not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]


def make_task(name: str, output_names: Sequence[str], **state: Any) -> Task:
    """A task by name; `state` is a checkpoint's task_state (or the settings of a new run)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](tuple(output_names), **state)  # type: ignore[call-arg,return-value]


def check_settings(settings: Any) -> None:
    """Refuse FinetuneSettings its task type cannot use (another type's settings, a missing manifest);
    each message names the setting and the task it applies to."""
    task = get_task(settings.task)
    task.check_settings(settings, TASKS.values())


def task_from_config(cfg: Any, output_names: Sequence[str]) -> Task:
    """A new run's task from FinetuneSettings settings (before fit/calibrate)."""
    return get_task(cfg.task).from_settings(cfg, output_names)  # type: ignore[return-value]
