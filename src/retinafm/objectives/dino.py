"""DINO self-distillation (Caron et al. 2021), the self-supervised comparator the RETFound paper trained.

A student sees every crop (2 global + N local), a momentum teacher (an exponential moving average
of the student) sees the global crops; the student learns to match the teacher's centred,
sharpened distribution over `out_dim` prototypes. Compact and tested against a direct
computation in tests/objectives/test_dino.py: no SSL library fits this project's dependencies (lightly
pulls in PyTorch Lightning for one loss).

The checkpoint keeps DINO's names (`student.` / `teacher.` with `backbone.` and `head.`), so the
teacher backbone loads wherever DINO-trained weights do (retinafm's RETFound-DINOv2 adapter).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from retinafm.runtime import distributed as dist_utils


class DinoHead(nn.Module):
    """MLP to a bottleneck, L2-normalised, then a weight-normalised prototype layer whose norm is
    fixed at 1 (DINO's norm_last_layer, which stabilises training)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        parts: list[nn.Module] = []
        for i in range(len(dims) - 1):
            parts.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                parts.append(nn.GELU())
        self.mlp = nn.Sequential(*parts)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class DinoLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax on each global crop and the
    student's softmax on every other crop, averaged over those pairs."""

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_epochs = warmup_epochs
        self.epoch = 0
        self.register_buffer("center", torch.zeros(1, out_dim))

    def current_teacher_temp(self) -> float:
        if self.epoch < self.warmup_epochs:
            progress = self.epoch / self.warmup_epochs
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * progress
        return self.teacher_temp

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int) -> torch.Tensor:
        """student_out: (n_crops·B, K), crops in order (globals first); teacher_out: (2·B, K)."""
        student = (student_out.float() / self.student_temp).chunk(n_crops)
        teacher = F.softmax((teacher_out.float() - self.center) / self.current_teacher_temp(), dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for t_index, t in enumerate(teacher):
            for s_index, s in enumerate(student):
                if s_index == t_index:  # the same view
                    continue
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the whole (all-rank) batch."""
        batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
        if dist_utils.is_distributed():
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count * (1 - self.center_momentum))


class _Network(nn.Module):
    def __init__(self, backbone: nn.Module, head: DinoHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        # One backbone pass per resolution (the global crops together, then the local ones).
        outputs, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            x = torch.cat(crops[start:end])
            outputs.append(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))
            start = end
        return self.head(torch.cat(outputs))


def teacher_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """DINO's cosine schedule from `base` to 1 over training."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1) / 2


class Dino(nn.Module):
    """forward(batch) → {"loss": ...} with `batch.images` the list of crops (globals first). Call
    `update_teacher(step)` after every optimiser step and `set_epoch(epoch)` before every epoch
    (teacher temperature warmup). Its state dict is the checkpoint's 'model': `student.` and
    `teacher.` (each `backbone.` + `head.`, DINO's own names) and the loss's `loss_fn.center`."""

    def __init__(self, backbone: nn.Module, *, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_epochs: int = 0, momentum: float = 0.996, total_steps: int = 1) -> None:
        super().__init__()
        width = backbone.num_features
        self.student = _Network(backbone, DinoHead(width, out_dim, hidden_dim, bottleneck_dim))
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.loss_fn = DinoLoss(out_dim, student_temp=student_temp, teacher_temp=teacher_temp,
                                warmup_teacher_temp=warmup_teacher_temp, warmup_epochs=warmup_teacher_epochs)
        self.momentum, self.total_steps = momentum, total_steps

    def set_epoch(self, epoch: int) -> None:
        self.loss_fn.epoch = epoch

    def crops_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            self.teacher.eval()
            teacher_out = self.teacher(crops[:2])
        return self.loss_fn(self.student(crops), teacher_out, len(crops))

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if not isinstance(batch.images, list) or len(batch.images) < 2:
            raise ValueError("DINO trains on multi-crop batches: a list of two global crops and any local ones")
        return {"loss": self.crops_loss(batch.images)}

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        m = teacher_momentum(step, self.total_steps, self.momentum)
        for s, t in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
