"""The one inference loop: a model over a dataset, sharded by rank and gathered back in input order."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Subset

from retinafm.data.loader import ImageDataset, make_loader
from retinafm.engine.progress import progress_bar
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.cpu import batch_runner
from retinafm.runtime.device import autocast


class NonFiniteOutputError(ValueError):
    """The model gave NaN or infinite outputs; they are never written as predictions or embeddings."""


@dataclass
class InferenceResult:
    """Outputs for the readable items of a dataset, in dataset order."""

    indices: np.ndarray  # dataset indices that were read
    logits: np.ndarray  # (len(indices), num_outputs) float32
    skipped: list[tuple[str, str]]


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """The objects alive now (the model, the imported libraries) left out of garbage collection while
    the loop runs: a full collection falling due mid-inference would otherwise walk all of them in the
    main process and in every DataLoader worker, which inherit the heap at fork and copy the pages the
    walk touches. Left as it is when the caller froze objects itself (see benchmarks/RESULTS.md)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()  # O(1): the generations move to the permanent one; workers forked now inherit that
    try:
        yield
    finally:
        gc.unfreeze()  # back into the oldest generation, collectable as before


@torch.inference_mode()
def infer(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    desc: str = "inference",
    progress: bool = True,
    cpu_tuning: bool | None = None,
) -> InferenceResult:
    """Run `model` over `dataset`. Under torchrun each rank takes a strided shard; every rank
    returns the gathered, ordered result so metrics are always computed on all images.

    On a CPU, runtime.cpu may run two batches side by side (`cpu_tuning`; None: the
    RETINAFM_CPU_TUNING switch, on by default); the outputs are the same either way."""
    model.eval()
    shard = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))

    def forward(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(device, amp_dtype):  # both thread-local: set in every thread
            return model(images.to(device, non_blocking=True)).float().cpu().numpy()

    skipped: list[tuple[str, str]] = []
    finished: list[tuple[np.ndarray, np.ndarray]] = []  # (outputs, dataset indices) per batch, in order
    with _heap_frozen(), batch_runner(forward, model, device, cpu_tuning) as runner:  # before the workers start
        loader = make_loader(Subset(dataset, shard), batch_size, num_workers=num_workers,
                             pin_memory=device.type == "cuda")
        for batch in progress_bar(loader, desc, progress):
            skipped += batch.skipped
            if batch.images.numel() > 0:
                finished += runner.submit(batch.images, batch.indices.numpy())
        finished += runner.drain()
    outputs = [out for out, _ in finished]
    indices = [idx for _, idx in finished]
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
    result = InferenceResult(all_idx[order], all_out[order], [s for p in parts for s in p[2]])
    _check_finite(result, dataset)
    return result


def _check_finite(result: InferenceResult, dataset: ImageDataset) -> None:
    """NaN probabilities would be written as an empty row and argmax as the first class: refuse instead."""
    bad = ~np.isfinite(result.logits).all(axis=1) if result.logits.size else np.zeros(0, bool)
    if bad.any():
        examples = ", ".join(str(dataset.paths[i]) for i in result.indices[bad][:3])
        raise NonFiniteOutputError(
            f"the model gave NaN or infinite outputs for {int(bad.sum())} of {len(bad)} image(s) (e.g. {examples}); "
            "nothing was written. Its weights may be corrupt or overflow in reduced precision: try --precision fp32, "
            "or the checkpoint of an earlier epoch")
