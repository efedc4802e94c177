"""Heatmaps for a set of images, laid back on each file: the loop behind `explain`, `predict --heatmaps`
and the overlays in report.html.

Each file is read at its full resolution and put through the checkpoint's own evaluation recipe step by
step (data.geometry), so the map over the model's input can be carried back through the centre crop, the
resize and the fundus or OCT crop onto the file's own pixels. The targets of each image are chosen from a
first forward pass (`--target predicted` explains what the model said), then the method runs on
(image, target) pairs in batches.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from retinafm.data.geometry import InputTrace, to_original, traced_transform
from retinafm.data.io import ImageReadError, read_image
from retinafm.data.loader import SkipLog
from retinafm.engine.heatmaps import explain_batch, rollout_with_outputs
from retinafm.engine.progress import progress_bar
from retinafm.runtime import distributed as dist_utils
from retinafm.runtime.device import autocast

TARGET_KEYWORDS = ("predicted", "all")
GIVEN = "given"  # the outputs each TracedImages item carries (the report's chosen cases)


@dataclass
class TracedItem:
    """One readable file: the model's input, where its pixels came from, and the file's pixels."""

    index: int
    input: torch.Tensor  # (3, S, S), normalised
    trace: InputTrace
    image: torch.Tensor  # (3, H, W) uint8, as read
    outputs: list[int] | None = None  # the outputs to explain, when the caller chose them per image


class TracedImages(Dataset):
    """Files read whole and put through `transform` with the trace of every step (see data.geometry).
    Unreadable files come back as (path, reason), like ImageDataset's skips."""

    def __init__(self, paths: Sequence[str], transform: Callable, outputs: Sequence[list[int]] | None = None) -> None:
        self.paths, self.transform = list(paths), transform
        self.outputs = list(outputs) if outputs is not None else None  # per path, for target="given"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> TracedItem | tuple[str, str]:
        try:
            image = read_image(self.paths[index])  # whole: the map goes back onto every pixel of it
        except ImageReadError as exc:
            return exc.path, exc.reason
        tensor, trace = traced_transform(self.transform, image)
        return TracedItem(index, tensor, trace, image, self.outputs[index] if self.outputs is not None else None)


def _collate(items: list) -> list:
    return items  # TracedItems and skips stay as they are; images differ in size


@dataclass
class Explanation:
    """The heatmap of one output of one image."""

    index: int  # into the dataset's paths
    path: str
    output: int
    target: str  # the output's name
    value: float  # the activated output: probability, or the value in the targets' units
    heatmap: np.ndarray  # (H, W) float32 in 0..1 at the file's resolution
    image: torch.Tensor  # (3, H, W) uint8


def resolve_target(target: str, output_names: Sequence[str]) -> str | int:
    """'predicted', 'all', or the index of the named output; an unknown name is refused with the names."""
    if target in TARGET_KEYWORDS:
        return target
    if target in output_names:
        return list(output_names).index(target)
    raise ValueError(f"--target {target!r} is not an output of this model; give predicted, all, or one of: "
                     f"{', '.join(output_names)}")


def chosen_outputs(task, outputs: np.ndarray, target: str | int, given: Sequence[list[int] | None] = ()
                   ) -> list[list[int]]:
    """Per image, the outputs to explain: what the task predicted, every output, the one named, or those given."""
    if target == GIVEN:
        return [list(g or []) for g in given]
    if target == "predicted":
        return task.explained_outputs(outputs)
    if target == "all":
        return [list(range(outputs.shape[1]))] * len(outputs)
    return [[int(target)]] * len(outputs)


def _pairs(choices: list[list[int]]) -> list[tuple[int, int]]:
    return [(b, k) for b, ks in enumerate(choices) for k in ks]


def explain_items(model: nn.Module, task, items: list[TracedItem], device: torch.device, *, method: str,
                  target: str | int, batch_size: int, amp_dtype: torch.dtype | None = None,
                  steps: int = 32) -> list[Explanation]:
    """Heatmaps of the chosen outputs of `items`, each laid back on its file."""
    images = torch.stack([item.input for item in items]).to(device)
    rollout = None
    with torch.no_grad(), autocast(device, amp_dtype):
        if method == "rollout":  # one pass gives the outputs and the (target-free) maps: predict's cost
            rollout, logits = rollout_with_outputs(model, images)
            rollout = rollout.float().cpu()
        else:
            logits = model(images)
    outputs = task.activate(logits.float().cpu())
    pairs = _pairs(chosen_outputs(task, outputs, target, [item.outputs for item in items]))
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = torch.tensor([b for b, _ in chunk], device=device)
        if rollout is not None:
            maps = rollout[rows.cpu()]
        else:
            with autocast(device, amp_dtype):
                maps = explain_batch(model, images[rows], torch.tensor([k for _, k in chunk]), method, steps=steps)
        for (b, k), heat in zip(chunk, maps.float().cpu(), strict=True):
            item = items[b]
            results.append(Explanation(item.index, "", k, task.output_names[k], float(outputs[b, k]),
                                       to_original(heat, item.trace), item.image))
    return results


def explain_dataset(model: nn.Module, task, dataset: TracedImages, device: torch.device, *, method: str,
                    target: str | int, batch_size: int, skip_log: SkipLog, num_workers: int = 0,
                    amp_dtype: torch.dtype | None = None, steps: int = 32, desc: str = "explain",
                    progress: bool = True) -> Iterator[Explanation]:
    """Explanations of this rank's share of `dataset`, batch by batch (so that the maps of a large folder
    are written as they come, not held); unreadable files go to `skip_log`."""
    model.eval()
    shard = Subset(dataset, list(range(dist_utils.rank(), len(dataset), dist_utils.world_size())))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for batch in progress_bar(loader, desc, progress):
        skip_log.add([item for item in batch if isinstance(item, tuple)])
        items = [item for item in batch if isinstance(item, TracedItem)]
        if not items:
            continue
        for explanation in explain_items(model, task, items, device, method=method, target=target,
                                         batch_size=batch_size, amp_dtype=amp_dtype, steps=steps):
            explanation.path = dataset.paths[explanation.index]
            yield explanation
