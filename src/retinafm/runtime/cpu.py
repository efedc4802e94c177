"""CPU-only speed settings, all in one place: two batches side by side, glibc's allocator kept
from returning activation memory, dynamic int8 Linear layers.

The first two are on by default for CPU inference and switched off together with
`RETINAFM_CPU_TUNING=0` (or `infer(..., cpu_tuning=False)`): then a CPU runs one batch after
another on all of torch's threads, with the allocator as the C library set it, exactly as on a
GPU. They never change an output, only how fast it comes. Why each helps is told, with its
measurements, in benchmarks/RESULTS.md ("Design notes").
"""
from __future__ import annotations

import ctypes
import functools
import os
import queue
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn as nn

ENV_SWITCH = "RETINAFM_CPU_TUNING"  # "0" / "false" / "off": no side-by-side batches, no allocator change

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES = 256 << 20  # free memory at the top of the heap kept for reuse
_MMAP_FROM_BYTES = 32 << 20  # allocations below this come from the heap (glibc's maximum on 64-bit)


def cpu_tuning_enabled(explicit: bool | None = None) -> bool:
    """The switch: an explicit True / False wins, else RETINAFM_CPU_TUNING (default on)."""
    if explicit is not None:
        return explicit
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache  # process-wide settings: once is enough
def keep_freed_memory() -> None:
    """Let glibc keep freed activation memory for the next batch instead of handing it back to the
    OS and page-faulting it in again on the next forward. Costs up to 256 MB of freed heap kept
    resident between batches. Process-wide and once (DataLoader workers forked afterwards inherit
    it). Linux glibc only; other allocators are left as they are."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError, TypeError):
        return  # not glibc (macOS, Windows, musl)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)


def stream_threads(model: nn.Module, device: torch.device) -> list[int]:
    """The intra-op threads of each forward run side by side: torch's threads split between two on
    a CPU; none (one batch after another, all threads) on a GPU, with a single thread, or for an
    model that runs on a thread pool of its own (`owns_threads`, e.g. ONNX Runtime's)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or any(getattr(m, "owns_threads", False) for m in model.modules()):
        return []
    return [threads - threads // 2, threads // 2]


class BatchRunner:
    """Runs `forward` over batches and hands the outputs back in submission order, each with its tag.

    With no streams a batch runs at once on the calling thread. With streams (CPU tuning) each
    stream is a thread with its own intra-op thread count, and at most one batch per stream is in
    flight: independent batches never wait on each other's OpenMP barriers."""

    def __init__(self, forward: Callable[[torch.Tensor], Any], streams: list[int]):
        self.forward, self.streams = forward, streams
        self._threads = torch.get_num_threads()
        self._running: deque[tuple[Future, Any]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        if streams:
            counts: queue.SimpleQueue[int] = queue.SimpleQueue()
            for n in streams:
                counts.put(n)
            self._pool = ThreadPoolExecutor(len(streams), initializer=lambda: torch.set_num_threads(counts.get()))

    def submit(self, images: torch.Tensor, tag: Any) -> list[tuple[Any, Any]]:
        """Start a batch; returns the (output, tag) pairs that are finished, oldest first."""
        if self._pool is None:
            return [(self.forward(images), tag)]
        done = []
        if len(self._running) == len(self.streams):
            done.append(self._pop())
        self._running.append((self._pool.submit(self.forward, images), tag))
        return done

    def drain(self) -> list[tuple[Any, Any]]:
        """The batches still in flight, in order."""
        return [self._pop() for _ in range(len(self._running))]

    def _pop(self) -> tuple[Any, Any]:
        future, tag = self._running[0]
        output = future.result()
        self._running.popleft()
        return output, tag

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self._threads)  # the streams' setting is process-wide for new threads

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def batch_runner(forward: Callable[[torch.Tensor], Any], model: nn.Module, device: torch.device,
                 tuning: bool | None = None) -> BatchRunner:
    """How `infer` runs its batches on this device: with CPU tuning (the switch), the allocator is
    set once and two batches run side by side; otherwise one after another."""
    if device.type != "cpu" or not cpu_tuning_enabled(tuning):
        return BatchRunner(forward, [])
    keep_freed_memory()  # before the DataLoader's workers fork, so that they inherit it
    return BatchRunner(forward, stream_threads(model, device))


def quantize_for_cpu(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """--cpu-int8: dynamic int8 quantisation of the Linear layers (weights int8, activations
    quantised per batch), which carry nearly all of a ViT's work; outputs change slightly (see
    benchmarks/RESULTS.md for speed and size of the change). fp32 stays the default."""
    if device.type != "cpu":
        raise ValueError("--cpu-int8 is for CPU inference; on a GPU, bf16 autocast is already used")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's eager API, still the CPU fast path here
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)
