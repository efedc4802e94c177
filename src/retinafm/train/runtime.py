"""Device and numeric precision choices, made once per run."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import warnings

import numpy as np
import torch

from ..config import check_precision
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


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX-512-BF16). Without
    either, bf16 autocast is emulated and several times slower than fp32 (measured on AVX2)."""
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES = 256 << 20  # free memory at the top of the heap kept for reuse
_MMAP_FROM_BYTES = 32 << 20  # allocations below this come from the heap (glibc's maximum on 64-bit)


@functools.cache  # process-wide settings: once is enough
def keep_freed_memory() -> None:
    """Let glibc keep freed activation memory for the next batch instead of handing it back to the OS.

    A CPU forward allocates and frees tens of MB of activations. With glibc's defaults, large
    blocks are mmapped afresh and the top of the heap is trimmed after each free, so every batch
    page-faults its activations in again: ViT-Ti/16 at batch 16 took ~26,000 page faults and
    ~70 ms of kernel time per forward (about a fifth of it), and none after this. The cost: up to
    256 MB of freed heap stays resident between batches instead of going back to the OS.
    Process-wide and once (DataLoader workers forked afterwards inherit it). Linux glibc only."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError, TypeError):
        return  # not glibc (macOS, Windows, musl): their allocators are left as they are
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)


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


def inference_dtype(device: torch.device, precision: str, *, cpu_int8: bool = False) -> torch.dtype | None:
    """The autocast dtype of predict / evaluate / embed: amp_dtype's, except under --cpu-int8, whose
    int8 Linear layers take fp32 activations (a forced bf16 / fp16 is refused there)."""
    check_precision(precision)
    if not cpu_int8:
        return amp_dtype(device, precision)
    if precision not in ("auto", "fp32"):
        raise ValueError(f"--cpu-int8 runs in fp32 around its int8 Linear layers; drop --precision {precision}")
    return None


def quantize_for_cpu(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--cpu-int8: dynamic int8 quantisation of the Linear layers (weights int8, activations
    quantised per batch), which carry nearly all of a ViT's work: ViT-B/16 predict at 224 px on 2
    AVX2 cores 1.53x the plain fp32 pipeline (benchmarks/RESULTS.md), max probability change 0.02
    on random weights. fp32 stays the default."""
    if device.type != "cpu":
        raise ValueError("--cpu-int8 is for CPU inference; on a GPU, bf16 autocast is already used")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's eager API, still the CPU fast path here
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)
