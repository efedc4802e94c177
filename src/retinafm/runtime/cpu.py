"""CPU-only speed settings: glibc kept from re-faulting freed activations, dynamic int8 Linear layers."""
from __future__ import annotations

import ctypes
import functools
import os
import warnings

import torch

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
