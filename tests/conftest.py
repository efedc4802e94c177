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
        out=str(out), data_path=str(data) if data else None, model="vit_micro_patch8", weights="none", input_size=32,
        epochs=2, warmup_epochs=1, batch_size=16, lr=1e-3, layer_decay=1.0, drop_path=0.0,
        randaug_magnitude=0, reprob=0.0, crop_min_scale=0.5, num_workers=0, device="cpu",
        bootstrap=0,  # tests that check confidence intervals ask for them
    )
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="session")
def trained_run(demo_data, tmp_path_factory) -> Path:
    """A finished 2-epoch run directory (read-only for the tests that use it)."""
    from retinafm.finetune import finetune

    run = tmp_path_factory.mktemp("trained") / "run"
    finetune(tiny_finetune_config(demo_data, run, epochs=2, bootstrap=200))
    return run


@pytest.fixture(scope="session")
def multilabel_manifest(tmp_path_factory) -> Path:
    """Synthetic fundus images with three independent findings, 5 % of label cells unknown."""
    from retinafm.data.synthetic import write_multilabel_dataset

    root = tmp_path_factory.mktemp("multilabel") / "data"
    return write_multilabel_dataset(root, n_train=120, n_val=40, n_test=40, size=64, seed=0)


@pytest.fixture(scope="session")
def regression_manifest(tmp_path_factory) -> Path:
    """Synthetic fundus images with a cup-to-disc ratio and a haemorrhage count to regress."""
    from retinafm.data.synthetic import write_regression_dataset

    root = tmp_path_factory.mktemp("regression") / "data"
    return write_regression_dataset(root, n_train=120, n_val=40, n_test=40, size=64, seed=0)


def tiny_manifest_config(manifest: Path, out: Path, **overrides):
    """A short run on a manifest at 64 px, where the synthetic findings are visible."""
    settings = dict(data_path=None, manifest=str(manifest), input_size=64, epochs=20, warmup_epochs=1,
                    batch_size=16, lr=1e-3, crop_min_scale=0.8, smoothing=0.0)
    settings.update(overrides)
    return tiny_finetune_config(None, out, **settings)
