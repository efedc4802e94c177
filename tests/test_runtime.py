from __future__ import annotations

import contextlib

import pytest
import torch

from retinafm.train.runtime import amp_dtype, autocast, resolve_device, seed_everything


def test_cpu_runs_in_fp32():
    assert resolve_device("cpu") == torch.device("cpu")
    assert amp_dtype(torch.device("cpu")) is None  # bf16 autocast is slower than fp32 on AVX2-only CPUs
    assert isinstance(autocast(torch.device("cpu"), None), contextlib.nullcontext)


def test_auto_and_missing_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_seed_everything_is_repeatable():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
