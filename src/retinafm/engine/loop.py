"""The training epoch every objective shares: `objective(batch)["loss"]`, backward, step.

AMP and gradient accumulation are handled here and nowhere else: autocast only where the
precision asks for it, a GradScaler for fp16, gradients through whatever wraps the objective (DDP).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from retinafm.data.loader import SkipLog
from retinafm.data.sources import DataSourceError
from retinafm.engine.progress import progress_bar
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import autocast


class NonFiniteLossError(RuntimeError):
    """Training diverged (the loss became nan or inf). A user error: the CLI reports it in one line
    with what to change; `tune` prunes the trial instead."""


def _diverged(loss_value: float, epoch: int, step: int, amp_dtype: torch.dtype | None) -> NonFiniteLossError:
    if amp_dtype == torch.float16:
        precision = "--precision fp16 overflows easily: use bf16 or fp32"
    else:
        precision = "fp32 (--precision fp32) is the most robust"
    return NonFiniteLossError(
        f"training diverged: the loss became {loss_value} at epoch {epoch}, step {step}. Lower the learning rate "
        f"(--lr / --blr), add --clip-grad 1.0, check the targets for extreme values; {precision}")


@dataclass
class StepSettings:
    accum_iter: int = 1
    clip_grad: float | None = None
    amp_dtype: torch.dtype | None = None


def train_one_epoch(
    objective: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    settings: StepSettings,
    scaler: torch.amp.GradScaler | None = None,
    skip_log: SkipLog | None = None,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`. Returns the mean training loss under "loss" (per image, averaged
    across ranks) and the per-step mean of every other scalar the objective returned.
    `after_step(global_update)` runs after every optimiser step (e.g. a momentum teacher's update)."""
    objective.train()
    steps = len(loader)
    updates_per_epoch = max(1, math.ceil(steps / settings.accum_iter))
    total, count, logged, logged_steps = 0.0, 0, {}, 0
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(loader, f"epoch {epoch}", progress)
    for step, batch in enumerate(bar):
        if skip_log is not None:
            skip_log.add(batch.skipped)
        if len(batch) == 0:
            continue
        batch = batch.to(device, non_blocking=True)
        with autocast(device, settings.amp_dtype):
            outputs = objective(batch)
        loss = outputs["loss"]
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise _diverged(loss_value, epoch, step, settings.amp_dtype)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss / settings.accum_iter).backward()
        else:
            (loss / settings.accum_iter).backward()
        if (step + 1) % settings.accum_iter == 0 or step + 1 == steps:
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(optimizer)
            if settings.clip_grad:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), settings.clip_grad)
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
        # Other outputs summed as tensors: reading them (a host sync on GPU) waits for the epoch's end.
        for key, value in outputs.items():
            if key != "loss":
                logged[key] = logged.get(key, 0.0) + (value.detach() if torch.is_tensor(value) else value)
        logged_steps += 1
        total += loss_value * len(batch)
        count += len(batch)
        bar.set_postfix(loss=f"{loss_value:.4f}")
    if dist_utils.mean_across_ranks(float(count)) == 0:
        examples = "; ".join(f"{p}: {r}" for p, r in (skip_log.frame().values[:3] if skip_log is not None else []))
        raise DataSourceError(f"none of the training images could be read, nothing to train on ({examples})")
    means = {k: dist_utils.mean_across_ranks(float(v) / max(logged_steps, 1)) for k, v in logged.items()}
    return {"loss": dist_utils.mean_across_ranks(total / max(count, 1)), **means}
