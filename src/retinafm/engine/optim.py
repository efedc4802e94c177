"""RETFound's optimisation recipe with timm's parts: AdamW over layer-wise lr-decay groups,
per-iteration linear warmup then cosine decay to min_lr."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler


def effective_lr(lr: float | None, blr: float, batch_size: int, accum_iter: int, world_size: int) -> float:
    """Absolute lr: given, or base lr scaled by the effective batch (batch × accum × GPUs) / 256."""
    if lr is not None:
        return lr
    return blr * batch_size * accum_iter * world_size / 256


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW; with layer_decay, each block's group gets lr_scale = decay^(depth - block) (timm).
    Biases and norms get no weight decay. On a GPU the fused kernel (one launch per step instead
    of one per tensor). MAE pretraining uses betas (0.9, 0.95)."""
    on_gpu = next(model.parameters()).is_cuda
    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        betas=betas,
        **({"fused": True} if on_gpu else {}),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int,
    min_lr: float,
) -> CosineLRScheduler:
    """Step with `scheduler.step_update(global_step)`; honours each group's lr_scale."""
    warmup = warmup_epochs * steps_per_epoch
    total = max(1, epochs * steps_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's lr (its group has lr_scale 1, the largest), i.e. the schedule's value."""
    return max(g["lr"] for g in optimizer.param_groups)
