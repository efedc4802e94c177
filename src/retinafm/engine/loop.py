"""The one training loop and the one inference loop every task and workflow shares.

AMP and distributed are handled here and nowhere else: autocast only on GPU, DDP gradients
through the wrapped model, inference sharded by rank and gathered back in input order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from retinafm.data.loader import SkipLog
from retinafm.data.sources import DataSourceError
from retinafm.engine.progress import progress_bar
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import autocast


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepSettings:
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    amp_dtype: Optional[torch.dtype] = None


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion: Optional[nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    settings: StepSettings,
    scaler: Optional[torch.amp.GradScaler] = None,
    mixup_fn: Optional[Callable] = None,
    skip_log: Optional[SkipLog] = None,
    progress: bool = True,
    after_step: Optional[Callable[[int], None]] = None,
) -> float:
    """One pass over `loader`; returns the mean training loss (averaged across ranks).
    `after_step(global_update)` runs after every optimiser step (e.g. a momentum teacher's update)."""
    model.train()
    steps = len(loader)
    updates_per_epoch = max(1, math.ceil(steps / settings.accum_iter))
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(loader, f"epoch {epoch}", progress)
    for step, batch in enumerate(bar):
        if skip_log is not None:
            skip_log.add(batch.skipped)
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if mixup_fn is not None and images.shape[0] % 2 == 0:
            images, targets = mixup_fn(images, targets)
        elif mixup_fn is not None:
            # Mixup needs pairs; an odd last batch is trained on hard one-hot (smoothed) targets.
            targets = _one_hot_smoothed(targets, mixup_fn)
        with autocast(device, settings.amp_dtype):
            # criterion None: the model computes its own loss from the batch (vision-language refinement)
            loss = model(images, targets) if criterion is None else criterion(model(images), targets)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"training loss became {loss_value} at epoch {epoch}, step {step}; lower --blr/--lr or use --clip-grad"
            )
        loss = loss / settings.accum_iter
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (step + 1) % settings.accum_iter == 0 or step + 1 == steps:
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(optimizer)
            if settings.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            if scaler is not None and scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update = epoch * updates_per_epoch + (step // settings.accum_iter) + 1
            scheduler.step_update(update)
            if after_step is not None:
                after_step(update)
        total += loss_value * images.shape[0]
        count += images.shape[0]
        bar.set_postfix(loss=f"{loss_value:.4f}")
    if dist_utils.mean_across_ranks(float(count)) == 0:
        examples = "; ".join(f"{p}: {r}" for p, r in (skip_log.frame().values[:3] if skip_log is not None else []))
        raise DataSourceError(f"none of the training images could be read, nothing to train on ({examples})")
    return dist_utils.mean_across_ranks(total / max(count, 1))


def _one_hot_smoothed(targets: torch.Tensor, mixup_fn) -> torch.Tensor:
    from timm.data.mixup import one_hot

    n = mixup_fn.num_classes
    off = mixup_fn.label_smoothing / n
    return one_hot(targets, n, on_value=1.0 - mixup_fn.label_smoothing + off, off_value=off)
