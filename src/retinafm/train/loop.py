"""The one training loop and the one inference loop every task and workflow shares.

AMP and distributed are handled here and nowhere else: autocast only on GPU, DDP gradients
through the wrapped model, inference sharded by rank and gathered back in input order.
"""
from __future__ import annotations

import math
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..data.loader import ImageDataset, SkipLog, make_loader
from ..data.sources import DataSourceError
from . import distributed as dist_utils
from .runtime import autocast, keep_freed_memory


class NonFiniteLossError(RuntimeError):
    pass


def _progress_bar(loader, desc: str, progress: bool) -> tqdm:
    """A bar over one iterator of `loader`. tqdm.auto's tqdm calls iter() on an iterable at
    construction, and the loop calls it again: a DataLoader then started a second set of workers
    (persistent ones: reset them) whose prefetched batches nobody read, twice the decoding of a
    64-image predict run. Handing tqdm the iterator makes the loop's iter() that same one."""
    return tqdm(iter(loader), total=len(loader), desc=desc, leave=False,
                disable=not (progress and dist_utils.is_primary()))


@dataclass
class StepSettings:
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    amp_dtype: Optional[torch.dtype] = None


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion: Optional[nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    *,
    epoch: int,
    settings: StepSettings,
    scaler: Optional[torch.amp.GradScaler] = None,
    mixup_fn: Optional[Callable] = None,
    skip_log: Optional[SkipLog] = None,
    progress: bool = True,
    after_step: Optional[Callable[[int], None]] = None,
) -> float:
    """One pass over `loader`; returns the mean training loss (averaged across ranks).
    `after_step(global_update)` runs after every optimiser step (e.g. a momentum teacher's update)."""
    model.train()
    steps = len(loader)
    updates_per_epoch = max(1, math.ceil(steps / settings.accum_iter))
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = _progress_bar(loader, f"epoch {epoch}", progress)
    for step, batch in enumerate(bar):
        if skip_log is not None:
            skip_log.add(batch.skipped)
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        if mixup_fn is not None and images.shape[0] % 2 == 0:
            images, targets = mixup_fn(images, targets)
        elif mixup_fn is not None:
            # Mixup needs pairs; an odd last batch is trained on hard one-hot (smoothed) targets.
            targets = _one_hot_smoothed(targets, mixup_fn)
        with autocast(device, settings.amp_dtype):
            # criterion None: the model computes its own loss from the batch (vision-language refinement)
            loss = model(images, targets) if criterion is None else criterion(model(images), targets)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"training loss became {loss_value} at epoch {epoch}, step {step}; lower --blr/--lr or use --clip-grad"
            )
        loss = loss / settings.accum_iter
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if (step + 1) % settings.accum_iter == 0 or step + 1 == steps:
            if scaler is not None and scaler.is_enabled():
                scaler.unscale_(optimizer)
            if settings.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            if scaler is not None and scaler.is_enabled():
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update = epoch * updates_per_epoch + (step // settings.accum_iter) + 1
            scheduler.step_update(update)
            if after_step is not None:
                after_step(update)
        total += loss_value * images.shape[0]
        count += images.shape[0]
        bar.set_postfix(loss=f"{loss_value:.4f}")
    if dist_utils.mean_across_ranks(float(count)) == 0:
        examples = "; ".join(f"{p}: {r}" for p, r in (skip_log.frame().values[:3] if skip_log is not None else []))
        raise DataSourceError(f"none of the training images could be read, nothing to train on ({examples})")
    return dist_utils.mean_across_ranks(total / max(count, 1))


def _one_hot_smoothed(targets: torch.Tensor, mixup_fn) -> torch.Tensor:
    from timm.data.mixup import one_hot

    n = mixup_fn.num_classes
    off = mixup_fn.label_smoothing / n
    return one_hot(targets, n, on_value=1.0 - mixup_fn.label_smoothing + off, off_value=off)


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
    from ..export import OnnxModel  # here, not at the top: export imports the training code

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
    bar = _progress_bar(loader, desc, progress)
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
