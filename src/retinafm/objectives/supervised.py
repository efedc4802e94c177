"""Supervised training: a backbone + task head, the task's training loss, optional mixup / cutmix."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def make_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Any | None:
    """timm's Mixup when either alpha is positive (it also applies the label smoothing), else None."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


class Supervised(nn.Module):
    """forward(batch) → {"loss": criterion(model(images), targets)}, with the batch mixed in training
    when `mixup` (timm's Mixup) is given; the criterion must then take soft targets."""

    def __init__(self, model: nn.Module, criterion: nn.Module, mixup: Any | None = None) -> None:
        super().__init__()
        self.model, self.criterion, self.mixup = model, criterion, mixup

    @classmethod
    def for_task(cls, model: nn.Module, task: Any, *, smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0) -> Supervised:
        """The task's training loss (label smoothing, soft targets under mixup) around `model`."""
        mix = make_mixup(mixup, cutmix, smoothing, task.num_outputs)
        return cls(model, task.train_loss(smoothing, soft_targets=mix is not None), mix)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch.images, batch.targets
        if self.mixup is not None and self.training:
            if images.shape[0] % 2 == 0:
                images, targets = self.mixup(images, targets)
            else:
                # Mixup needs pairs; an odd last batch is trained on hard one-hot (smoothed) targets.
                targets = _one_hot_smoothed(targets, self.mixup)
        return {"loss": self.criterion(self.model(images), targets)}


def _one_hot_smoothed(targets: torch.Tensor, mixup: Any) -> torch.Tensor:
    from timm.data.mixup import one_hot

    n = mixup.num_classes
    off = mixup.label_smoothing / n
    return one_hot(targets, n, on_value=1.0 - mixup.label_smoothing + off, off_value=off)
