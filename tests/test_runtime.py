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


def test_cpu_int8_quantises_linear_layers_and_keeps_outputs_close():
    from retinafm.models.registry import create_model, get_spec
    from retinafm.train.runtime import quantize_for_cpu

    torch.manual_seed(0)
    model = create_model(get_spec("vit_micro_patch8"), 3, input_size=32).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        reference = model(x).softmax(dim=1)
        quantised = quantize_for_cpu(model, torch.device("cpu"))
        got = quantised(x).softmax(dim=1)
    assert sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantised.modules()) >= 4 * 4
    assert (got - reference).abs().max() < 0.05 and not torch.equal(got, reference)
    with pytest.raises(ValueError, match="--cpu-int8 is for CPU"):
        quantize_for_cpu(model, torch.device("cuda", 0))


def test_keep_freed_memory_is_harmless_and_once():
    from retinafm.train.runtime import keep_freed_memory

    keep_freed_memory()
    keep_freed_memory()
    assert torch.ones(8 << 20).sum().item() == 8 << 20  # large allocations still work
