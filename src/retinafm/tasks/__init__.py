"""Task types: each supplies head size, loss, activation, metrics and its selection metric."""
from __future__ import annotations

from typing import Sequence

from .multiclass import MulticlassTask

TASKS = {"multiclass": MulticlassTask}


def make_task(name: str, class_names: Sequence[str]) -> MulticlassTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](tuple(class_names))
