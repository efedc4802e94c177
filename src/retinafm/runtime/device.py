"""Device and numeric precision choices, made once per run."""
from __future__ import annotations

import contextlib
import warnings

import torch

from retinafm.runtime.distributed import local_rank
from retinafm.settings import ConfigError, check_device, check_precision


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of --device (auto, cpu, cuda, cuda:N). A device this machine lacks is a
    ConfigError (one line from the CLI), raised before anything is loaded onto it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)  # mps, xpu, typos: refused in the words validate() uses
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu "
                              "(or auto)")
        if name == "cuda":
            return torch.device("cuda", local_rank())
        if int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
    return torch.device(name)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX-512-BF16). Without
    either, bf16 autocast is emulated and several times slower than fp32."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a run (None: fp32), chosen per machine for --precision auto: bf16 on a
    GPU that has it, else fp16 (with a gradient scaler); on a CPU bf16 only where the hardware does
    bf16 matrix products, else fp32. An explicit fp32 / bf16 / fp16 is honoured where it can run."""
    check_precision(precision)
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU has no bf16; use --precision fp16 (or auto)")
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _AUTOCAST[precision]
    if precision == "fp16":
        raise ValueError("--precision fp16 is for GPUs without bf16; on a CPU use fp32 or bf16 (or auto)")
    native = cpu_has_native_bf16()
    if precision == "bf16" and not native:
        warnings.warn("--precision bf16 on a CPU without AMX or AVX-512-BF16 is several times slower than fp32; "
                      "leave --precision at auto", UserWarning, stacklevel=2)
    if precision == "auto":
        return torch.bfloat16 if native else None
    return _AUTOCAST[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """What a run records and prints for its autocast dtype."""
    return {dtype: name for name, dtype in _AUTOCAST.items()}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_dtype(device: torch.device, precision: str, *, cpu_int8: bool = False) -> torch.dtype | None:
    """The autocast dtype of predict / evaluate / embed: amp_dtype's, except under --cpu-int8, whose
    int8 Linear layers take fp32 activations (a forced bf16 / fp16 is refused there)."""
    check_precision(precision)
    if not cpu_int8:
        return amp_dtype(device, precision)
    if precision not in ("auto", "fp32"):
        raise ValueError(f"--cpu-int8 runs in fp32 around its int8 Linear layers; drop --precision {precision}")
    return None
