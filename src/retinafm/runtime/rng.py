"""Seeding and every random generator's state, saved in checkpoints so a resumed run continues bit for bit."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """Every random generator a training epoch draws from (torch, NumPy for timm's mixup, Python's
    `random`), as tensors so a checkpoint holding them still opens with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "rng_numpy_extra": torch.tensor([float(pos), float(has_gauss), float(cached)], dtype=torch.float64),
        "rng_python": torch.tensor([version, *words], dtype=torch.int64),
        "rng_python_gauss": torch.tensor([float("nan") if gauss_next is None else gauss_next], dtype=torch.float64),
    }


def restore_rng_state(state: dict) -> None:
    """Undo `rng_state` (a checkpoint from before these were saved restores torch's alone)."""
    torch.set_rng_state(state["rng_cpu"])
    if "rng_numpy" in state:
        pos, has_gauss, cached = state["rng_numpy_extra"].tolist()
        np.random.set_state(("MT19937", state["rng_numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "rng_python" in state:
        values = state["rng_python"].tolist()
        gauss = state["rng_python_gauss"].item()
        random.setstate((values[0], tuple(values[1:]), None if gauss != gauss else gauss))
