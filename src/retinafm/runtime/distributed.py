"""Thin glue over torch.distributed for torchrun: who am I, who writes, gather outputs.

`torchrun --nproc_per_node=N -m retinafm finetune ...` sets RANK/WORLD_SIZE/LOCAL_RANK; without
them everything runs as a single process and these helpers are no-ops.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU); True when distributed."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_primary() -> bool:
    """Only rank 0 writes files and prints summaries."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_across_ranks(value: float) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
