"""Device and numeric precision choices, made once per run."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .distributed import local_rank


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank())
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 (or fp16) autocast on GPU; fp32 on CPU, where bf16 is several times slower without AMX."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
