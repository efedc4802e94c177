from __future__ import annotations

import contextlib

import pytest
import torch

from retinafm.runtime import device as runtime
from retinafm.runtime.device import (
    amp_dtype,
    autocast,
    inference_dtype,
    precision_name,
    resolve_device,
)
from retinafm.runtime.rng import seed_everything
from retinafm.settings import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
CPU_HAS_NATIVE_BF16 = runtime.cpu_has_native_bf16  # taken before conftest pins the suite to fp32


def _cpu_caps(monkeypatch, **flags):
    caps = {"avx2": True, "amx_bf16": False, "avx512_bf16": False, **flags}
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", CPU_HAS_NATIVE_BF16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


def test_cpu_without_native_bf16_runs_in_fp32(monkeypatch):
    _cpu_caps(monkeypatch)  # an AVX2 CPU like this one: bf16 autocast is emulated, several times slower
    assert resolve_device("cpu") == CPU
    assert amp_dtype(CPU) is None
    assert amp_dtype(CPU, "fp32") is None
    assert isinstance(autocast(CPU, None), contextlib.nullcontext)


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_cpu_with_native_bf16_autocasts_to_bf16(monkeypatch, flag):
    _cpu_caps(monkeypatch, **{flag: True})
    assert amp_dtype(CPU) is torch.bfloat16
    assert amp_dtype(CPU, "fp32") is None  # an explicit fp32 is honoured, e.g. to match results across machines


def test_this_machine_choice_follows_its_capabilities(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", CPU_HAS_NATIVE_BF16)
    caps = torch.cpu.get_capabilities()
    native = bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    assert amp_dtype(CPU) is (torch.bfloat16 if native else None)


def test_forced_bf16_on_a_cpu_without_it_warns_and_fp16_is_refused(monkeypatch):
    _cpu_caps(monkeypatch)
    with pytest.warns(UserWarning, match="several times slower than fp32"):
        assert amp_dtype(CPU, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="--precision fp16 is for GPUs"):
        amp_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, fp16, not 'half'"):
        amp_dtype(CPU, "half")


def test_gpu_choice(monkeypatch):
    # No GPU is needed to check the decision: only whether the GPU has bf16 matters.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(CUDA) is torch.bfloat16
    assert amp_dtype(CUDA, "fp16") is torch.float16
    assert amp_dtype(CUDA, "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert amp_dtype(CUDA) is torch.float16
    with pytest.raises(ValueError, match="this GPU has no bf16; use --precision fp16"):
        amp_dtype(CUDA, "bf16")


def test_precision_names_and_int8():
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
    assert inference_dtype(CPU, "auto", cpu_int8=True) is None and inference_dtype(CPU, "fp32", cpu_int8=True) is None
    with pytest.raises(ValueError,
                       match="--cpu-int8 runs in fp32 around its int8 Linear layers; drop --precision bf16"):
        inference_dtype(CPU, "bf16", cpu_int8=True)


def test_auto_and_missing_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_seed_everything_is_repeatable():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_cpu_int8_quantises_linear_layers_and_keeps_outputs_close():
    from retinafm.models.registry import create_model, get_spec
    from retinafm.runtime.cpu import quantize_for_cpu

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
    from retinafm.runtime.cpu import keep_freed_memory

    keep_freed_memory()
    keep_freed_memory()
    assert torch.ones(8 << 20).sum().item() == 8 << 20  # large allocations still work


def test_cpu_tuning_switch(monkeypatch):
    from retinafm.runtime.cpu import ENV_SWITCH, batch_runner, cpu_tuning_enabled

    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert cpu_tuning_enabled() and not cpu_tuning_enabled(False)
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(ENV_SWITCH, off)
        assert not cpu_tuning_enabled() and cpu_tuning_enabled(True)
    torch.set_num_threads(2)
    try:
        model = torch.nn.Linear(2, 2)
        with batch_runner(lambda x: x, model, torch.device("cpu")) as runner:  # switched off by the environment
            assert runner.streams == []
            assert runner.submit(torch.ones(1), "a") == [(torch.ones(1), "a")]
        with batch_runner(lambda x: x * 2, model, torch.device("cpu"), tuning=True) as runner:
            assert runner.streams == [1, 1]
            done = runner.submit(torch.ones(1), "a") + runner.submit(torch.ones(1), "b")
            done += runner.submit(torch.ones(1), "c") + runner.drain()
            assert [tag for _, tag in done] == ["a", "b", "c"] and all(out.item() == 2 for out, _ in done)
    finally:
        torch.set_num_threads(1)
