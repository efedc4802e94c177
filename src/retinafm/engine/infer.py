"""The one inference loop: a model over a dataset, sharded by rank and gathered back in input order."""
from __future__ import annotations

import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from retinafm.data.loader import ImageDataset, make_loader
from retinafm.engine.progress import progress_bar
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.cpu import keep_freed_memory
from retinafm.runtime.device import autocast


@dataclass
class InferenceResult:
    """Outputs for the readable items of a dataset, in dataset order."""

    indices: np.ndarray  # dataset indices that were read
    logits: np.ndarray  # (len(indices), num_outputs) float32
    skipped: list[tuple[str, str]]


def _cpu_streams(model: nn.Module, device: torch.device) -> list[int]:
    """The intra-op threads of each of the forwards `infer` runs side by side: on a CPU, torch's
    threads split between two (see infer); none (one batch after another, all threads) on a GPU,
    with a single thread, or for an ONNX Runtime model, which has its own thread pool."""
    from retinafm.models.onnx import OnnxModel

    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or any(isinstance(m, OnnxModel) for m in model.modules()):
        return []
    return [threads - threads // 2, threads // 2]


@torch.inference_mode()
def infer(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
    desc: str = "inference",
    progress: bool = True,
) -> InferenceResult:
    """Run `model` over `dataset`. Under torchrun each rank takes a strided shard; every rank
    returns the gathered, ordered result so metrics are always computed on all images.

    On a CPU two batches run at once, each on half of torch's threads, instead of one batch on
    all of them. A ViT's many small ops each end in an OpenMP barrier, and whenever one thread is
    preempted (by the DataLoader workers decoding on the same cores, or any other thread) the
    others spin until it is back; independent batches never wait for each other. ViT-Ti/16,
    batch 16, 2 cores, 2 workers: 3-8% more img/s end to end on a quiet host, more on a busy one
    (there a 2-thread forward took 410-570 ms, two side by side 340-400 ms a batch). The outputs
    are the same (bitwise here: no image's arithmetic depends on the thread count); it costs a
    second batch's activations in memory."""
    model.eval()
    shard = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
    if device.type == "cpu":
        keep_freed_memory()  # before the workers fork, so that they inherit it
    loader = make_loader(
        Subset(dataset, shard), batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    threads = torch.get_num_threads()
    streams = _cpu_streams(model, device)

    def forward(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(device, amp_dtype):  # both thread-local: set in each stream
            return model(images.to(device, non_blocking=True)).float().cpu().numpy()

    stream_threads: queue.SimpleQueue[int] = queue.SimpleQueue()
    for n in streams:
        stream_threads.put(n)
    pool = ThreadPoolExecutor(len(streams), initializer=lambda: torch.set_num_threads(stream_threads.get())) \
        if streams else None
    running: deque[tuple[Future, np.ndarray]] = deque()
    indices, outputs, skipped = [], [], []
    bar = progress_bar(loader, desc, progress)
    try:
        for batch in bar:
            skipped += batch.skipped
            if batch.images.numel() == 0:
                continue
            if pool is None:
                outputs.append(forward(batch.images))
                indices.append(batch.indices.numpy())
                continue
            if len(running) == len(streams):  # at most one batch per stream in flight, kept in order
                outputs.append(running[0][0].result())
                indices.append(running.popleft()[1])
            running.append((pool.submit(forward, batch.images), batch.indices.numpy()))
        while running:
            outputs.append(running[0][0].result())
            indices.append(running.popleft()[1])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)  # the streams' setting is process-wide for new threads
    local = (
        np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64),
        np.concatenate(outputs) if outputs else None,
        skipped,
    )
    parts = dist_utils.all_gather_objects(local)
    all_idx = np.concatenate([p[0] for p in parts])
    width = next((p[1].shape[1] for p in parts if p[1] is not None), 0)
    all_out = np.concatenate([p[1] if p[1] is not None else np.zeros((0, width), np.float32) for p in parts])
    order = np.argsort(all_idx, kind="stable")
    return InferenceResult(all_idx[order], all_out[order], [s for p in parts for s in p[2]])
