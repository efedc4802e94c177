"""Shared fixtures. Tests never touch the network: the Hub is forced offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two xdist workers share two cores

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small synthetic fundus data set in the folder layout (3 classes, 64 px)."""
    from retinafm.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "data"
    return write_demo_dataset(root, n_train=24, n_val=8, n_test=8, size=64, seed=0)


def tiny_finetune_config(data: Path, out: Path, **overrides):
    from retinafm.config import FinetuneConfig

    settings = dict(
        out=str(out), data_path=str(data), model="vit_micro_patch8", weights="none", input_size=32,
        epochs=2, warmup_epochs=1, batch_size=16, lr=1e-3, layer_decay=1.0, drop_path=0.0,
        randaug_magnitude=0, reprob=0.0, crop_min_scale=0.5, num_workers=0, device="cpu",
    )
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """A finished 2-epoch run directory (read-only for the tests that use it)."""
    from retinafm.finetune import finetune

    run = tmp_path_factory.mktemp("trained") / "run"
    finetune(tiny_finetune_config(demo_data, run, epochs=2))
    return run
