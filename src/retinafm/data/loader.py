"""Torch datasets over samples: decode, transform, and skip unreadable files without stopping.

A file that cannot be decoded comes back as a skip record instead of an image; the collate
function drops it from the batch and hands the (path, reason) to the caller, which writes
skipped.csv. This works the same with DataLoader worker processes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from retinafm.data.io import ImageReadError, read_image


def _to(images: torch.Tensor | list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]):
    return [fn(t) for t in images] if isinstance(images, list) else fn(images)


@dataclass
class Batch:
    """A collated batch. `images` is one stacked tensor, or for self-supervised multi-crop a list
    with one stacked tensor per view (globals first)."""

    images: torch.Tensor | list[torch.Tensor]
    targets: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        """The number of images (samples) in the batch, whatever the number of views."""
        return len(self.indices)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(_to(self.images, move), move(self.targets), self.indices, self.skipped)

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) pins through this method: without it a dataclass batch
        stays in pageable memory and `non_blocking` host-to-GPU copies are synchronous."""
        return Batch(_to(self.images, torch.Tensor.pin_memory), self.targets.pin_memory(), self.indices, self.skipped)


class ImageDataset(Dataset):
    """Items are (image tensor, target, index) or, for an unreadable file, (None, (path, reason), index).

    Targets are class indices (None → -1) or, for multilabel/regression, float vectors with NaN
    for missing values (a None row becomes all-NaN).
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int | Sequence[float] | None],
                 transform: Callable, decode_size: int | None = None) -> None:
        self.paths = list(paths)
        if any(isinstance(t, (tuple, list, np.ndarray)) for t in targets):
            width = next(len(t) for t in targets if t is not None)
            self.targets = [np.full(width, np.nan, np.float32) if t is None else np.asarray(t, np.float32)
                            for t in targets]
        else:
            self.targets = [(-1 if t is None else int(t)) for t in targets]
        self.transform = transform
        # See read_image: large JPEGs decode at a reduced scale. The recipes carry their own size.
        self.decode_size = decode_size if decode_size is not None else getattr(transform, "decode_size", None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.paths[index], self.decode_size)
        except ImageReadError as exc:
            return None, (exc.path, exc.reason), index
        return self.transform(image), self.targets[index], index


def collate_skipping(items: list) -> Batch:
    good = [it for it in items if it[0] is not None]
    skipped = [it[1] for it in items if it[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    if isinstance(good[0][0], (list, tuple)):  # multi-crop views
        images: torch.Tensor | list[torch.Tensor] = [torch.stack([it[0][k] for it in good])
                                                     for k in range(len(good[0][0]))]
    else:
        images = torch.stack([it[0] for it in good])
    if isinstance(good[0][1], np.ndarray):
        targets = torch.from_numpy(np.stack([it[1] for it in good]))
    else:
        targets = torch.tensor([it[1] for it in good], dtype=torch.long)
    indices = torch.tensor([it[2] for it in good], dtype=torch.long)
    return Batch(images, targets, indices, skipped)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
        # Training iterates many epochs; keeping workers alive saves their start-up each epoch.
        persistent_workers=persistent and num_workers > 0,
    )


class SkipLog:
    """Collects unreadable files (once each) and writes them as skipped.csv."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, records: Sequence[tuple[str, str]]) -> None:
        for path, reason in records:
            self._reasons.setdefault(path, reason)

    def __len__(self) -> int:
        return len(self._reasons)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(sorted(self._reasons.items()), columns=["path", "reason"])
